//! The commit's preconditions, checked when a capture begins (so an archive that could not commit is
//! refused before anything is uploaded) and again in the commit step itself, before its first write:
//! the caller's ACL on every key the commit touches, each key's type, and on a cluster its slot.

use redis_module::{Context, KeyType};

use crate::archive::flow::Captured;
use crate::layout::Layout;
use crate::ops::errors::FlowError;
use crate::runtime::acl::{self, Access, Caller};
use crate::runtime::cluster;
use crate::runtime::server::expect_type;

/// One key the commit touches: what it must hold and what is done to it.
struct Touched {
    key: String,
    expected: KeyType,
    access: Access,
}

/// Every key the commit of `flow` reads or writes, in one list for the ACL, type and slot checks.
fn touched(flow: &Captured, layout: &Layout) -> Vec<Touched> {
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

/// The caller may touch every key of `flow`, each holds its expected type (or nothing), and on a cluster all of
/// them sit in one slot this node serves.
pub fn check(
    ctx: &Context,
    caller: &Caller,
    flow: &Captured,
    layout: &Layout,
) -> Result<(), FlowError> {
    let touched = touched(flow, layout);
    for t in &touched {
        acl::check(ctx, caller, &t.key, t.access)?;
        expect_type(ctx, &t.key, &t.expected)?;
    }
    let keys: Vec<&str> = touched.iter().map(|t| t.key.as_str()).collect();
    cluster::check(ctx, &keys)
}
