//! Where a flow lives: key-name templates for the engine's layout and the S3 object key of its archive.
//!
//! Templates use `$name` placeholders (`$prefix`, `$id`, `$status`, `$label`, `$value`; `$$` is a literal
//! `$`). Braces are left alone so templates can carry cluster hash tags, e.g. `$prefix:{flow:$id}:events`.

use crate::slot;

pub const VARS: &[&str] = &["prefix", "id", "status", "label", "value"];

#[derive(Default)]
pub struct Vars<'a> {
    pub prefix: &'a str,
    pub id: &'a str,
    pub status: &'a str,
    pub label: &'a str,
    pub value: &'a str,
}

enum Piece<'t> {
    Text(&'t str),
    Var(&'t str),
}

fn pieces(template: &str) -> Result<Vec<Piece<'_>>, String> {
    Pieces(template).collect()
}

/// A template's pieces in order, read as they are asked for: `render` runs for every key of every
/// flow, and builds nothing but the key.
struct Pieces<'t>(&'t str);

impl<'t> Iterator for Pieces<'t> {
    type Item = Result<Piece<'t>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.0;
        // A byte search: `$` is ASCII, and a template is a few dozen bytes, where `str::find`'s
        // general searcher costs more than it saves.
        match rest.bytes().position(|b| b == b'$') {
            None if rest.is_empty() => None,
            None => {
                self.0 = "";
                Some(Ok(Piece::Text(rest)))
            }
            Some(pos) if pos > 0 => {
                self.0 = &rest[pos..];
                Some(Ok(Piece::Text(&rest[..pos])))
            }
            Some(_) => {
                let after = &rest[1..];
                if let Some(stripped) = after.strip_prefix('$') {
                    self.0 = stripped;
                    return Some(Ok(Piece::Text("$")));
                }
                let len = after.bytes().take_while(|c| c.is_ascii_lowercase()).count();
                let name = &after[..len];
                if !VARS.contains(&name) {
                    self.0 = "";
                    return Some(Err(format!(
                        "unknown placeholder '${name}' (known: $prefix $id $status $label $value, $$ for '$')"
                    )));
                }
                self.0 = &after[len..];
                Some(Ok(Piece::Var(name)))
            }
        }
    }
}

/// The longest template (or key prefix) accepted: key names are short, and `Layout::check_keys`
/// compares every pair of templates in time that grows with their lengths.
pub const MAX_TEMPLATE: usize = 256;

/// Checks a template: only `allowed` placeholders, every one of `required` present.
pub fn validate(template: &str, allowed: &[&str], required: &[&str]) -> Result<(), String> {
    if template.len() > MAX_TEMPLATE {
        return Err(format!("longer than {MAX_TEMPLATE} bytes"));
    }
    let parts = pieces(template)?;
    for p in &parts {
        if let Piece::Var(name) = p {
            if !allowed.contains(name) {
                return Err(format!("placeholder '${name}' is not allowed here"));
            }
        }
    }
    for need in required {
        if !parts
            .iter()
            .any(|p| matches!(p, Piece::Var(n) if n == need))
        {
            return Err(format!("must contain ${need}"));
        }
    }
    Ok(())
}

/// Fills a template that `validate` accepted; an invalid one renders its text verbatim.
pub fn render(template: &str, vars: &Vars) -> String {
    // Room for the whole key up front (a label index key holds a label's value too).
    let filled = [vars.prefix, vars.id, vars.status, vars.label, vars.value];
    let mut out =
        String::with_capacity(template.len() + filled.iter().map(|v| v.len()).sum::<usize>());
    for p in Pieces(template) {
        let Ok(p) = p else {
            return template.to_string();
        };
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Var("prefix") => out.push_str(vars.prefix),
            Piece::Var("id") => out.push_str(vars.id),
            Piece::Var("status") => out.push_str(vars.status),
            Piece::Var("label") => out.push_str(vars.label),
            Piece::Var(_) => out.push_str(vars.value),
        }
    }
    out
}

/// Where a flow's state comes from (`flowarchive.state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateSource {
    /// The engine's state folded from the flow's snapshot and events, as the Argyll engine folds it
    /// (`format::engine`).
    Fold,
    /// The stored snapshot as it is (layouts whose engine keeps it current).
    Snapshot,
}

/// The key names of one engine layout; optional parts are `None` when their template is empty.
#[derive(Clone, Debug)]
pub struct Layout {
    pub prefix: String,
    pub events: String,
    pub snapshot: String,
    pub seq: Option<String>,
    pub labels: Option<String>,
    pub status_hash: Option<String>,
    pub status_set: Option<String>,
    pub label_set: Option<String>,
    pub label_values: Option<String>,
    pub member: String,
    /// The engine archiver's lease on a flow (`$prefix:archive:lease:$id`), if the engine has one.
    pub lease: Option<String>,
    pub index: String,
    /// Index names used before `index` (`flowarchive.index-read-keys`): read, never written.
    pub earlier_indexes: Vec<String>,
    pub terminal: Vec<String>,
    /// Where a flow's state comes from: folded from its events, or its stored snapshot.
    pub state: StateSource,
}

/// The concrete key names of one flow.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowKeys {
    pub events: String,
    pub snapshot: String,
    pub seq: Option<String>,
    pub labels: Option<String>,
    pub status_hash: Option<String>,
    /// The flow's name in engine-wide indexes (`flow:<id>` by default).
    pub member: String,
    pub lease: Option<String>,
    pub index: String,
    /// The flow's hashes under earlier index names (`index-read-keys`), read only.
    pub earlier_indexes: Vec<String>,
}

impl FlowKeys {
    /// Every key of the flow with the config of the template it comes from (for cluster placement).
    pub fn named(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("events-key", Some(&self.events)),
            ("snapshot-key", Some(&self.snapshot)),
            ("seq-key", self.seq.as_ref()),
            ("labels-key", self.labels.as_ref()),
            ("status-key", self.status_hash.as_ref()),
            ("lease-key", self.lease.as_ref()),
            ("index-key", Some(&self.index)),
        ]
        .into_iter()
        .filter_map(|(name, key)| key.map(|k| (name, k.as_str())))
    }

    /// The flow's own keys (its event log, snapshot, sequence and labels), which the commit deletes.
    pub fn own(&self) -> impl Iterator<Item = &str> {
        self.state().chain(self.labels.as_deref())
    }

    /// The keys the engine's state is folded from (event log, snapshot, sequence): what a live read
    /// reads.
    pub fn state(&self) -> impl Iterator<Item = &str> {
        [Some(&self.events), Some(&self.snapshot), self.seq.as_ref()]
            .into_iter()
            .flatten()
            .map(String::as_str)
    }
}

impl Layout {
    fn vars<'a>(&'a self, id: &'a str) -> Vars<'a> {
        Vars {
            prefix: &self.prefix,
            id,
            ..Vars::default()
        }
    }

    /// The engine's layout with the default configs, for tests.
    #[cfg(test)]
    pub fn argyll() -> Layout {
        Layout {
            prefix: "argyll".into(),
            events: "$prefix:flow:$id:events".into(),
            snapshot: "$prefix:flow:$id:snapshot:val".into(),
            seq: Some("$prefix:flow:$id:snapshot:seq".into()),
            labels: Some("$prefix:flow:$id:idx:labels".into()),
            status_hash: Some("$prefix:idx:status".into()),
            status_set: Some("$prefix:idx:status:$status".into()),
            label_set: Some("$prefix:idx:label:$label:$value".into()),
            label_values: Some("$prefix:idx:label:$label".into()),
            member: "flow:$id".into(),
            lease: Some("$prefix:archive:lease:$id".into()),
            index: "archived:flows".into(),
            earlier_indexes: Vec::new(),
            terminal: vec!["completed".into(), "failed".into()],
            state: StateSource::Fold,
        }
    }

    pub fn flow_keys(&self, id: &str) -> FlowKeys {
        let v = self.vars(id);
        let opt = |t: &Option<String>| t.as_deref().map(|t| render(t, &v));
        FlowKeys {
            events: render(&self.events, &v),
            snapshot: render(&self.snapshot, &v),
            seq: opt(&self.seq),
            labels: opt(&self.labels),
            status_hash: opt(&self.status_hash),
            member: render(&self.member, &v),
            lease: opt(&self.lease),
            index: index_key(&self.index, id, &v),
            earlier_indexes: (self.earlier_indexes.iter())
                .filter(|t| **t != self.index)
                .map(|t| index_key(t, id, &v))
                .collect(),
        }
    }

    pub fn status_set_key(&self, id: &str, status: &str) -> Option<String> {
        let v = Vars {
            status,
            ..self.vars(id)
        };
        self.status_set.as_deref().map(|t| render(t, &v))
    }

    pub fn label_set_key(&self, id: &str, label: &str, value: &str) -> Option<String> {
        let v = Vars {
            label,
            value,
            ..self.vars(id)
        };
        self.label_set.as_deref().map(|t| render(t, &v))
    }

    pub fn label_values_key(&self, id: &str, label: &str) -> Option<String> {
        let v = Vars {
            label,
            ..self.vars(id)
        };
        self.label_values.as_deref().map(|t| render(t, &v))
    }

    /// The flow id a flow-member name (`flow:<id>`) stands for.
    pub fn id_of_member(&self, member: &str) -> Option<String> {
        invert(&self.member, &self.prefix, member)
    }

    /// The key every flow has, which a sweep without a status index walks with SCAN: the event log
    /// when the state is folded from it (a snapshot alone is no flow), else the snapshot.
    pub fn scanned(&self) -> &str {
        match self.state {
            StateSource::Fold => &self.events,
            StateSource::Snapshot => &self.snapshot,
        }
    }

    /// The flow id of a `scanned` key, and a SCAN pattern that matches every such key.
    pub fn id_of_scanned_key(&self, key: &str) -> Option<String> {
        invert(self.scanned(), &self.prefix, key)
    }

    pub fn scan_pattern(&self) -> Option<String> {
        let (pre, post) = split_at_id(self.scanned(), &self.prefix)?;
        Some(format!("{}*{}", glob_escape(&pre), glob_escape(&post)))
    }

    pub fn is_terminal(&self, status: &str) -> bool {
        self.terminal.iter().any(|t| t == status)
    }
}

/// The index hash of a flow under the index name `template`. On a cluster a name without `$id` names
/// one hash per slot, `<name>:{N}` in the flow's slot (see `runtime::cluster`), so the entry lives
/// with the flow.
fn index_key(template: &str, id: &str, v: &Vars) -> String {
    let base = render(template, v);
    if !slot::enabled() || uses_id(template) {
        return base;
    }
    slot::slot_index_key(&base, slot::key_slot(id.as_bytes()))
}

/// Whether a template holds `$id`.
fn uses_id(template: &str) -> bool {
    pieces(template).is_ok_and(|parts| parts.iter().any(|p| matches!(p, Piece::Var("id"))))
}

/// The text before and after `$id` in a rendered template (which must hold `$id` exactly once).
fn split_at_id(template: &str, prefix: &str) -> Option<(String, String)> {
    const MARK: &str = "\u{1}";
    let rendered = render(
        template,
        &Vars {
            prefix,
            id: MARK,
            ..Vars::default()
        },
    );
    let mut parts = rendered.split(MARK);
    let (pre, post) = (parts.next()?, parts.next()?);
    parts
        .next()
        .is_none()
        .then(|| (pre.to_string(), post.to_string()))
}

fn invert(template: &str, prefix: &str, rendered: &str) -> Option<String> {
    let (pre, post) = split_at_id(template, prefix)?;
    let id = rendered.strip_prefix(&pre)?.strip_suffix(&post)?;
    (!id.is_empty()).then(|| id.to_string())
}

fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

mod objects;
mod overlap;
#[cfg(test)]
mod tests;

pub use objects::*;
#[cfg(test)]
use overlap::*;
