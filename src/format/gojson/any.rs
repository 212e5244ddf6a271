//! A value of Go type `any`, written as Go writes it while it is read: keys put in Go's order once,
//! at the end.

use super::*;

/// Appends a string as Go writes it.
pub(super) fn write_text(out: &mut Vec<u8>, s: Str<'_>, scratch: &mut String) {
    match s.verbatim() {
        Some(text) => write_str(out, text),
        None => {
            scratch.clear();
            s.unquote_into(scratch);
            write_str(out, scratch);
        }
    }
}

/// The text of a key `Reader::any` wrote (what Go sorts map keys by).
pub(super) fn written_key(out: &[u8], pair: Pair) -> Cow<'_, str> {
    let quoted = out
        .get(pair.key + 1..pair.colon.saturating_sub(1))
        .unwrap_or_default();
    Str(quoted).text()
}

/// Appends to `order` the pairs of an object written at `pairs` (its last pair ends before its
/// closing brace at the end of `out`) in the order Go writes a map: by their keys' bytes, the last of
/// duplicate keys kept.
pub(super) fn go_order(out: &[u8], pairs: &[Pair], order: &mut Vec<(usize, usize)>) {
    let close = out.len().saturating_sub(1);
    let mut entries: Vec<(Cow<'_, str>, usize, usize)> = pairs
        .iter()
        .enumerate()
        .map(|(n, &pair)| {
            // A pair runs to the comma before the next key.
            let stop = pairs
                .get(n + 1)
                .map_or(close, |next| next.key.saturating_sub(1));
            (written_key(out, pair), pair.key, stop)
        })
        .collect();
    // Stable: of equal keys, the last written stays last.
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (n, (key, start, stop)) in entries.iter().enumerate() {
        if entries.get(n + 1).is_none_or(|(next, ..)| next != key) {
            order.push((*start, *stop));
        }
    }
}

/// What `Reader::any` wrote (`out`), with the objects in `reorders` put in their order, in one pass
/// (a stack of its own, however deep they nest).
pub(super) fn reordered(out: &[u8], reorders: &mut [Reorder], order: &[(usize, usize)]) -> Vec<u8> {
    /// What is left to write: the text `out[pos..end]` (the objects in it from `reorders[next]` on
    /// in their order), or the pairs of `reorders[object]` from its `n`th on.
    enum Task {
        Text { pos: usize, end: usize, next: usize },
        Pairs { object: usize, n: usize },
    }
    // Noted as they closed, inner first; by where they begin, an object's nested ones follow it.
    reorders.sort_unstable_by_key(|r| r.start);
    let first_in = |pos: usize| reorders.partition_point(|r| r.start < pos);
    let mut text = Vec::with_capacity(out.len());
    let mut tasks = vec![Task::Text {
        pos: 0,
        end: out.len(),
        next: 0,
    }];
    while let Some(task) = tasks.last_mut() {
        match task {
            Task::Text { pos, end, next } => match reorders.get(*next).filter(|r| r.start < *end) {
                Some(r) => {
                    text.extend_from_slice(out.get(*pos..r.start).unwrap_or_default());
                    text.push(b'{');
                    let object = *next;
                    *pos = r.end;
                    *next = first_in(r.end);
                    tasks.push(Task::Pairs { object, n: 0 });
                }
                None => {
                    text.extend_from_slice(out.get(*pos..*end).unwrap_or_default());
                    tasks.pop();
                }
            },
            Task::Pairs { object, n } => {
                let pairs = reorders
                    .get(*object)
                    .and_then(|r| order.get(r.from..r.to))
                    .unwrap_or_default();
                match pairs.get(*n) {
                    Some(&(pos, end)) => {
                        if *n > 0 {
                            text.push(b',');
                        }
                        *n += 1;
                        tasks.push(Task::Text {
                            pos,
                            end,
                            next: first_in(pos),
                        });
                    }
                    None => {
                        text.push(b'}');
                        tasks.pop();
                    }
                }
            }
        }
    }
    text
}
