//! The commit's preconditions, checked when a capture begins (so an archive that could not commit is
//! refused before anything is uploaded) and again in the commit step itself, before its first write:
//! the caller's ACL on every key the commit touches, each key's type, and on a cluster that every key
//! is in the flow's slot.
//!
//! The commit step checks every key (`check`): it runs later, and anything may have changed since. The
//! capture checks, in the same step, what it has not checked itself (`check_rest`): it has checked
//! the caller's rights on the flow's keys, its status entries and the index entry's keys before
//! reading them, the types of the keys it read as it judged them, and the placement of the flow's
//! keys, so it leaves the label indexes, an earlier incarnation's entry (for its removal) and the
//! index entry's keys' types to the guard.

use std::borrow::Cow;

use redis_module::{Context, KeyType};

use crate::format::captured::Captured;
use crate::index::{self, Entry, Object};
use crate::layout::Layout;
use crate::ops::errors::{show_key, FlowError};
use crate::runtime::acl::{self, Access, Caller};
use crate::runtime::cluster;
use crate::runtime::server::{self, expect_type};

/// One key the commit touches: the template it comes from, what it must hold, what is done to it,
/// and what it is to the flow.
struct Touched<'k> {
    template: &'static str,
    /// Borrowed from the flow's keys, or rendered for it (its indexes).
    key: Cow<'k, str>,
    expected: KeyType,
    access: Access,
    role: Role,
}

impl Touched<'_> {
    fn named(&self) -> (&'static str, &str) {
        (self.template, &self.key)
    }

    fn access(&self) -> (&str, Access) {
        (&self.key, self.access)
    }
}

/// What a key the commit touches is to the flow, which says what a capture checks of it itself.
#[derive(Clone, Copy)]
enum Role {
    /// The flow's own keys and its status entry: the capture checks the caller's rights on them
    /// before it reads them, and their types as it judges them.
    Flow,
    /// The status ZSET of the flow's status: its rights are checked before it is read, its type
    /// judged.
    StatusSet,
    /// Where the index entry is written: its rights checked with the flow's keys.
    Index,
    /// An earlier incarnation's entry, which the commit replaces or removes: its type checked by the
    /// lookup that found it, before reading it.
    Previous,
    /// A label index, which only the guard checks.
    Label,
}

impl Role {
    fn allowed_at_capture(self) -> bool {
        matches!(self, Role::Flow | Role::StatusSet | Role::Index)
    }

    fn typed_at_capture(self) -> bool {
        matches!(self, Role::Flow | Role::StatusSet | Role::Previous)
    }
}

/// Every key the commit of `flow` reads or writes, in one list for the ACL, type and slot checks.
fn touched<'k>(
    flow: &'k Captured,
    previous: Option<&'k Entry>,
    layout: &Layout,
    index_keys: &'k [String],
) -> Vec<Touched<'k>> {
    let keys = &flow.keys;
    let entry = |template, key: Cow<'k, str>, expected, access, role| Touched {
        template,
        key,
        expected,
        access,
        role,
    };
    let own = |template, key: &'k str, expected| {
        entry(template, key.into(), expected, Access::Remove, Role::Flow)
    };
    let index =
        |key: &'k str, access, role| entry("index-key", key.into(), KeyType::Hash, access, role);
    // Room for every key at once: the flow's own four, the index's, an earlier entry's two, the two
    // status entries and two per label.
    let mut out = Vec::with_capacity(8 + index_keys.len() + 2 * flow.labels.len());
    out.push(own("events-key", &keys.events, KeyType::List));
    out.push(own("snapshot-key", &keys.snapshot, KeyType::String));
    out.extend(keys.seq.iter().map(|k| own("seq-key", k, KeyType::String)));
    out.extend(
        keys.labels
            .iter()
            .map(|k| own("labels-key", k, KeyType::Hash)),
    );
    out.extend(
        index_keys
            .iter()
            .map(|k| index(k, Access::Add, Role::Index)),
    );
    // An earlier incarnation's entry, which the commit replaces or removes.
    let earlier = previous.into_iter().flat_map(Entry::keys);
    out.extend(earlier.map(|k| index(k, Access::Remove, Role::Previous)));
    out.extend(
        keys.status_hash
            .iter()
            .map(|k| own("status-key", k, KeyType::Hash)),
    );
    if let Some(set) = layout.status_set_key(&flow.id, &flow.status) {
        let role = Role::StatusSet;
        out.push(entry(
            "status-set-key",
            set.into(),
            KeyType::ZSet,
            Access::Remove,
            role,
        ));
    }
    let label = |template, key: String| {
        entry(
            template,
            key.into(),
            KeyType::Set,
            Access::Remove,
            Role::Label,
        )
    };
    for (name, value) in &flow.labels {
        if let Some(set) = layout.label_set_key(&flow.id, name, value) {
            out.push(label("label-set-key", set));
        }
        if let Some(values) = layout.label_values_key(&flow.id, name) {
            out.push(label("label-values-key", values));
        }
    }
    out
}

/// In the commit step: the caller may touch every key of `flow`, all of them as one command (with the
/// lease key the commit reads; `acl`), each holds its expected type (or nothing), and on a cluster
/// every one sits in the flow's slot (a key elsewhere is refused naming its template). The flow's
/// slot on a cluster.
pub fn check(
    ctx: &Context,
    caller: &Caller,
    flow: &Captured,
    previous: Option<&Entry>,
    layout: &Layout,
    object: Object,
) -> Result<Option<u16>, FlowError> {
    let caller = caller.one_command();
    let index_keys = index::written_keys(ctx, &caller, &flow.keys, &flow.id, object)?;
    let touched = touched(flow, previous, layout, &index_keys);
    let slot = cluster::placement(&flow.id, touched.iter().map(Touched::named))?;
    let lease = flow.keys.lease.as_deref().map(|k| (k, Access::Read));
    acl::check_keys(
        ctx,
        &caller,
        touched.iter().map(Touched::access).chain(lease),
    )?;
    for t in &touched {
        expect_type(ctx, &t.key, &t.expected)?;
    }
    kept(ctx, &touched)?;
    Ok(slot)
}

/// At capture, in the step that checked and read the flow (`capture::inspect`, with the caller inside
/// its one command and the keys its index entry is written to): `check` of what the capture has not
/// checked itself.
pub fn check_rest(
    ctx: &Context,
    caller: &Caller,
    flow: &Captured,
    previous: Option<&Entry>,
    layout: &Layout,
    index_keys: &[String],
) -> Result<(), FlowError> {
    let touched = touched(flow, previous, layout, index_keys);
    let placed: Vec<&str> = flow.keys.named().map(|(_, key)| key).collect();
    let unplaced = touched.iter().filter(|t| !placed.contains(&t.key.as_ref()));
    cluster::placement(&flow.id, unplaced.map(Touched::named))?;
    let unallowed = touched.iter().filter(|t| !t.role.allowed_at_capture());
    acl::check_keys(ctx, caller, unallowed.map(Touched::access))?;
    for t in touched.iter().filter(|t| !t.role.typed_at_capture()) {
        expect_type(ctx, &t.key, &t.expected)?;
    }
    kept(ctx, &touched)
}

/// The index entry must outlive the commit: no key it is written to is one the commit removes data
/// from, and the server can neither evict nor expire it.
fn kept(ctx: &Context, touched: &[Touched]) -> Result<(), FlowError> {
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
    server::index_kept(ctx, written.iter().map(|t| t.key.as_ref()))
}
