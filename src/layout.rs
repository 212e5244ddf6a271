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
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(pos) = rest.find('$') {
        if pos > 0 {
            out.push(Piece::Text(&rest[..pos]));
        }
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push(Piece::Text("$"));
            rest = stripped;
            continue;
        }
        let len = after.bytes().take_while(|c| c.is_ascii_lowercase()).count();
        let name = &after[..len];
        if !VARS.contains(&name) {
            return Err(format!(
                "unknown placeholder '${name}' (known: $prefix $id $status $label $value, $$ for '$')"
            ));
        }
        out.push(Piece::Var(name));
        rest = &after[len..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    Ok(out)
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
    let Ok(parts) = pieces(template) else {
        return template.to_string();
    };
    let mut out = String::with_capacity(template.len() + vars.id.len());
    for p in parts {
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

/// One position of a template read as a pattern: a byte of its text (or of `$prefix`), or a run of
/// bytes of any length: any bytes (a placeholder) or digits (a compact index bucket's number).
#[derive(Clone, Copy, PartialEq)]
enum Tok {
    Byte(u8),
    Any,
    Digits,
}

impl Tok {
    /// Whether a run `self` can hold the byte `b`.
    fn holds(self, b: u8) -> bool {
        match self {
            Tok::Any => true,
            Tok::Digits => b.is_ascii_digit(),
            Tok::Byte(_) => false,
        }
    }
}

/// A template as the pattern of every key it renders: `$prefix` filled in, any other placeholder
/// any text.
fn pattern(template: &str, prefix: &str) -> Vec<Tok> {
    let mut out = Vec::with_capacity(template.len());
    for piece in pieces(template).unwrap_or_else(|_| vec![Piece::Text(template)]) {
        match piece {
            Piece::Text(t) => out.extend(t.bytes().map(Tok::Byte)),
            Piece::Var("prefix") => out.extend(prefix.bytes().map(Tok::Byte)),
            Piece::Var(_) => out.push(Tok::Any),
        }
    }
    out
}

/// Every key an index name stands for: the hash itself, and the compact format's meta hash and
/// buckets, each also per slot on a cluster (`<name>:{<tag>}…`).
fn index_patterns(template: &str, prefix: &str) -> Vec<Vec<Tok>> {
    let base = pattern(template, prefix);
    let text = |t: &str| t.bytes().map(Tok::Byte).collect::<Vec<_>>();
    let mut slot = text(":{");
    slot.push(Tok::Any);
    slot.push(Tok::Byte(b'}'));
    let mut out = Vec::new();
    for stem in [Vec::new(), slot] {
        let mut u = text(":u");
        u.push(Tok::Digits);
        let mut s = text(":s");
        s.push(Tok::Digits);
        for tail in [Vec::new(), text(":meta"), u, s] {
            out.push([base.as_slice(), &stem, &tail].concat());
        }
    }
    out
}

/// Whether some key matches both patterns. `meet[i][j]`: the rest of `a` from `i` and of `b` from `j`
/// can render the same text. A run may stand for nothing, or take the other side's next byte; a byte
/// both runs would take can be left out of both, so a run never needs to meet a run.
fn can_meet(a: &[Tok], b: &[Tok]) -> bool {
    let (n, m) = (a.len(), b.len());
    let mut meet = vec![vec![false; m + 1]; n + 1];
    for i in (0..=n).rev() {
        for j in (0..=m).rev() {
            meet[i][j] = match (a.get(i).copied(), b.get(j).copied()) {
                (None, None) => true,
                (Some(run @ (Tok::Any | Tok::Digits)), other) => {
                    meet[i + 1][j]
                        || match other {
                            Some(Tok::Byte(c)) => run.holds(c) && meet[i][j + 1],
                            Some(_) => meet[i][j + 1],
                            None => false,
                        }
                }
                (other, Some(run @ (Tok::Any | Tok::Digits))) => {
                    meet[i][j + 1]
                        || matches!(other, Some(Tok::Byte(c)) if run.holds(c) && meet[i + 1][j])
                }
                (Some(Tok::Byte(x)), Some(Tok::Byte(y))) => x == y && meet[i + 1][j + 1],
                _ => false,
            };
        }
    }
    meet[0][0]
}

impl Layout {
    /// Refuses a layout in which two kinds of key can be the same key: the archive index (under its
    /// name or any earlier one) and a key an archive reads, writes or deletes, or one of the engine's
    /// indexes; or a flow's own keys (deleted by its commit) and another flow's own keys or an engine
    /// index. Either would let an archive write its entry into a key it then deletes, write locations
    /// into the engine's hashes, or delete another flow's data. Checked where the layout is used, since
    /// configs are set one at a time and may pass through such a state on the way to a sound one
    /// (judged once per change, by `Settings`).
    pub fn check_keys(&self) -> Result<(), String> {
        let named = |name: &'static str, t: &Option<String>| {
            t.as_deref()
                .map(|t| (name, t.to_string(), pattern(t, &self.prefix)))
        };
        let some = |t: &String| Some(t.clone());
        let own: Vec<_> = [
            named("events-key", &some(&self.events)),
            named("snapshot-key", &some(&self.snapshot)),
            named("seq-key", &self.seq),
            named("labels-key", &self.labels),
        ]
        .into_iter()
        .flatten()
        .collect();
        let shared: Vec<_> = [
            named("status-key", &self.status_hash),
            named("status-set-key", &self.status_set),
            named("label-set-key", &self.label_set),
            named("label-values-key", &self.label_values),
            named("lease-key", &self.lease),
        ]
        .into_iter()
        .flatten()
        .collect();
        let mut index = Vec::new();
        for (name, t) in std::iter::once(("index-key", &self.index))
            .chain(self.earlier_indexes.iter().map(|t| ("index-read-keys", t)))
        {
            let patterns = index_patterns(t, &self.prefix);
            index.extend(patterns.into_iter().map(|p| (name, t.clone(), p)));
        }
        let clash = |(a, at, ap): &(&str, String, Vec<Tok>),
                     (b, bt, bp): &(&str, String, Vec<Tok>)| {
            can_meet(ap, bp).then(|| {
                format!(
                    "flowarchive.{a} {at:?} and flowarchive.{b} {bt:?} can name the same key (with key-prefix {:?}); an archive could then delete or overwrite what the other holds, so nothing is archived or read until they cannot meet",
                    self.prefix
                )
            })
        };
        for (i, a) in own.iter().enumerate() {
            for b in own[i + 1..].iter().chain(&shared).chain(&index) {
                if let Some(why) = clash(a, b) {
                    return Err(why);
                }
            }
        }
        for a in &index {
            for b in &shared {
                if let Some(why) = clash(a, b) {
                    return Err(why);
                }
            }
        }
        Ok(())
    }
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

use crate::digest::{hex, sha256};

/// S3 allows object keys up to 1024 bytes.
pub const MAX_OBJECT_KEY: usize = 1024;

/// The longest object name (a key's last segment) stores take by default: MinIO and SeaweedFS refuse
/// a segment of 256 bytes or more (`KeyTooLongError`), AWS only keys past 1024 bytes.
pub const OBJECT_NAME_MAX: usize = 255;

/// The length of the longest `_sha256` object name (`<64 hex>.g15.jsonl.gz`): no store limit below it
/// can be met.
pub const SHA_NAME_LEN: usize = 64 + ".g15.jsonl.gz".len();

/// Escapes a flow id for an object key: bytes outside `[A-Za-z0-9_-]` become `%XX` (uppercase hex of each
/// UTF-8 byte). `/` and `.` are escaped too, so an id never forms a path segment or `..`. Reversible.
pub fn escape_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `<prefix>/flows/<escaped id>.jsonl.gz` for DB 0 (the key objects have always had), and
/// `<prefix>/db<n>/flows/<escaped id>.jsonl.gz` for DB n > 0, so the same id in two DBs is two objects.
/// Generation g > 0 (see `GENERATIONS`) ends in `.g<g>.jsonl.gz` instead.
/// An id whose escaped key would pass S3's 1024-byte limit is stored under
/// `<folder>/flows/_sha256/<hex of the id>.jsonl.gz`; its header still names the id. This is the key
/// the compact index rebuilds (`object_file`); `stored_key` also takes the store's name limit.
pub fn object_key(prefix: &str, db: i32, id: &str, generation: u32) -> String {
    let folder = object_folder(prefix, db);
    let file = object_file(&folder, id, generation);
    folder + &file
}

/// The key an archive is stored under: `object_key`, or its `_sha256` form when the object's name
/// (the key's last segment) would pass `max_name` bytes, the longest the store takes
/// (`object-name-max`).
pub fn stored_key(prefix: &str, db: i32, id: &str, generation: u32, max_name: usize) -> String {
    let folder = object_folder(prefix, db);
    let file = object_file(&folder, id, generation);
    let name = file.rsplit('/').next().unwrap_or(&file);
    if name.len() <= max_name {
        return folder + &file;
    }
    folder + &sha_file(id, generation)
}

/// The part of an object key before `flows/`: empty, `<prefix>/`, `db<n>/` or `<prefix>/db<n>/`.
pub fn object_folder(prefix: &str, db: i32) -> String {
    match (prefix.is_empty(), db) {
        (true, 0) => String::new(),
        (true, db) => format!("db{db}/"),
        (false, 0) => format!("{prefix}/"),
        (false, db) => format!("{prefix}/db{db}/"),
    }
}

fn suffix(generation: u32) -> String {
    match generation {
        0 => ".jsonl.gz".to_string(),
        g => format!(".g{g}.jsonl.gz"),
    }
}

/// The rest of an object key after `folder`: `flows/<escaped id>[.g<g>].jsonl.gz`, or the `_sha256`
/// name when the whole key would pass S3's limit. The compact index stores the folder once and
/// rebuilds each location with this (see `index`).
pub fn object_file(folder: &str, id: &str, generation: u32) -> String {
    // An escaped id never holds '.', so a generation suffix cannot meet another id's key.
    let file = format!("flows/{}{}", escape_id(id), suffix(generation));
    if folder.len() + file.len() <= MAX_OBJECT_KEY {
        return file;
    }
    sha_file(id, generation)
}

fn sha_file(id: &str, generation: u32) -> String {
    format!(
        "flows/_sha256/{}{}",
        hex(&sha256(id.as_bytes())),
        suffix(generation)
    )
}

/// How many object keys one flow may use. Objects are written once: when an attempt stored its object
/// but did not commit (a crash, a failover, a change) and the flow then changed, the next attempt
/// writes the next generation instead of replacing history another server may already index.
pub const GENERATIONS: u32 = 16;

/// The keys a flow's archives are stored under (`stored_key`), from generation `first` on.
pub fn stored_keys_from<'a>(
    prefix: &'a str,
    db: i32,
    id: &'a str,
    first: u32,
    max_name: usize,
) -> impl Iterator<Item = String> + 'a {
    (first..GENERATIONS).map(move |g| stored_key(prefix, db, id, g, max_name))
}

/// Every key an archive of the flow may have been stored under, whatever the name limit was: each
/// generation's `object_key` and its `_sha256` form.
pub fn readable_keys<'a>(
    prefix: &'a str,
    db: i32,
    id: &'a str,
) -> impl Iterator<Item = String> + 'a {
    let folder = object_folder(prefix, db);
    (0..GENERATIONS).flat_map(move |g| {
        [
            object_key(prefix, db, id, g),
            folder.clone() + &sha_file(id, g),
        ]
    })
}

/// The object key folder of a head `s3://bucket/<folder>`.
pub fn location_folder(head: &str) -> Option<&str> {
    let (_, folder) = head.strip_prefix("s3://")?.split_once('/')?;
    (folder.is_empty() || folder.ends_with('/')).then_some(folder)
}

/// A location as `(head, generation)` with `location == head + object_file(folder, id, generation)`;
/// `None` for anything that is not one of the flow's object keys.
pub fn split_location<'l>(location: &'l str, id: &str) -> Option<(&'l str, u32)> {
    let (head, file) = location.split_at(location.rfind("flows/")?);
    let folder = location_folder(head)?;
    let generation = (0..GENERATIONS).find(|&g| object_file(folder, id, g) == file)?;
    Some((head, generation))
}

#[cfg(test)]
mod tests;
