//! The commit's preconditions, checked when a capture begins (so an archive that could not commit is
//! refused before anything is uploaded) and again in the commit step itself, before its first write:
//! the caller's ACL on every key the commit touches, each key's type, and on a cluster that every key
//! is in the flow's slot.

use redis_module::{Context, KeyType};

use crate::format::captured::Captured;
use crate::index::{self, Entry};
use crate::layout::Layout;
use crate::ops::errors::{show_key, FlowError};
use crate::runtime::acl::{self, Access, Caller};
use crate::runtime::cluster;
use crate::runtime::server::{self, expect_type};

/// One key the commit touches: the template it comes from, what it must hold and what is done to it.
struct Touched {
    template: &'static str,
    key: String,
    expected: KeyType,
    access: Access,
}

/// Every key the commit of `flow` reads or writes, in one list for the ACL, type and slot checks.
fn touched(
    flow: &Captured,
    previous: Option<&Entry>,
    layout: &Layout,
    index_keys: Vec<String>,
) -> Vec<Touched> {
    let keys = &flow.keys;
    let entry = |template, key: &str, expected, access| Touched {
        template,
        key: key.to_string(),
        expected,
        access,
    };
    let mut out = vec![
        entry("events-key", &keys.events, KeyType::List, Access::Remove),
        entry(
            "snapshot-key",
            &keys.snapshot,
            KeyType::String,
            Access::Remove,
        ),
    ];
    out.extend(
        keys.seq
            .iter()
            .map(|k| entry("seq-key", k, KeyType::String, Access::Remove)),
    );
    out.extend(
        keys.labels
            .iter()
            .map(|k| entry("labels-key", k, KeyType::Hash, Access::Remove)),
    );
    out.extend(
        index_keys
            .iter()
            .map(|k| entry("index-key", k, KeyType::Hash, Access::Add)),
    );
    // An earlier incarnation's entry, which the commit replaces or removes.
    out.extend(previous.iter().flat_map(|previous| {
        previous
            .keys()
            .map(|k| entry("index-key", k, KeyType::Hash, Access::Remove))
    }));
    out.extend(
        keys.status_hash
            .iter()
            .map(|k| entry("status-key", k, KeyType::Hash, Access::Remove)),
    );
    if let Some(set) = layout.status_set_key(&flow.id, &flow.status) {
        out.push(entry("status-set-key", &set, KeyType::ZSet, Access::Remove));
    }
    for (label, value) in &flow.labels {
        if let Some(set) = layout.label_set_key(&flow.id, label, value) {
            out.push(entry("label-set-key", &set, KeyType::Set, Access::Remove));
        }
        if let Some(values) = layout.label_values_key(&flow.id, label) {
            out.push(entry(
                "label-values-key",
                &values,
                KeyType::Set,
                Access::Remove,
            ));
        }
    }
    out
}

/// The caller may touch every key of `flow`, all of them as one command (with the lease key the
/// commit reads; `acl`), each holds its expected type (or nothing), and on a cluster every one sits in
/// the flow's slot (a key elsewhere is refused naming its template). The flow's slot on a cluster.
pub fn check(
    ctx: &Context,
    caller: &Caller,
    flow: &Captured,
    previous: Option<&Entry>,
    layout: &Layout,
) -> Result<Option<u16>, FlowError> {
    let caller = caller.one_command();
    let touched = touched(
        flow,
        previous,
        layout,
        index::written_keys(ctx, &caller, &flow.keys, &flow.id)?,
    );
    let slot = cluster::placement(
        &flow.id,
        touched.iter().map(|t| (t.template, t.key.as_str())),
    )?;
    let lease = flow.keys.lease.as_deref().map(|k| (k, Access::Read));
    acl::check_keys(
        ctx,
        &caller,
        touched
            .iter()
            .map(|t| (t.key.as_str(), t.access))
            .chain(lease),
    )?;
    for t in &touched {
        expect_type(ctx, &t.key, &t.expected)?;
    }
    // The index entry must outlive the commit: no key it is written to is one the commit removes
    // data from, and the server can neither evict nor expire it.
    let written: Vec<&Touched> = touched
        .iter()
        .filter(|t| matches!(t.access, Access::Add))
        .collect();
    for w in &written {
        if let Some(other) = touched.iter().find(|t| {
            t.key == w.key && !matches!(t.access, Access::Add) && t.template != w.template
        }) {
            return Err(FlowError::Unsafe(format!(
                "its index entry would be written to {}, a key the commit also removes data from ({}); the layout must keep them apart",
                show_key(&w.key),
                other.template
            )));
        }
    }
    server::index_kept(ctx, written.iter().map(|t| t.key.as_str()))?;
    Ok(slot)
}
