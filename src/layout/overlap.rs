//! Whether two key templates can name the same key: each template read as a pattern (`$prefix`
//! filled in, any other placeholder any text), two patterns compared for a common key. What
//! `Layout::check_keys` refuses layouts by.

use super::*;

/// One position of a template read as a pattern: a byte of its text (or of `$prefix`), or a run of
/// bytes of any length: any bytes (a placeholder) or digits (a compact index bucket's number).
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Tok {
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
pub(super) fn pattern(template: &str, prefix: &str) -> Vec<Tok> {
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
pub(super) fn index_patterns(template: &str, prefix: &str) -> Vec<Vec<Tok>> {
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
pub(super) fn can_meet(a: &[Tok], b: &[Tok]) -> bool {
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
