//! The engine's flow state (`FlowState`), folded from a flow's stored snapshot and events exactly as the
//! Argyll engine folds them when it loads a flow from Valkey, and written as its HTTP API writes it, so
//! `FLOWARCHIVE.GET` answers the engine's own bytes. Pure code: no server calls.
//!
//! How the engine loads a flow (timebox's Redis store, Argyll's appliers): it starts from an empty state
//! (or from the stored snapshot, decoded into that empty state, when one exists), then applies the
//! events from index `snapshot:seq` (0 without one) in log order. An event whose element is not an
//! event (not JSON, a field of the wrong type) fails the load: the engine answers an error, and so does
//! the fold. An event of a type without an applier, or whose `data` does not decode into the event's
//! type, is skipped. An applier that would dereference something missing (a step the plan does not
//! have, a work item the step does not know when it starts) panics in the engine, which then answers
//! 500: the fold reports it. A state without an id is a flow the engine does not know (404).
//!
//! Each element is read in place (`gojson`: no tree), and the data of an event is decoded only by the
//! applier of its type: the data of any other event is passed over, so a large payload the engine
//! ignores costs the fold no memory.

use crate::format::gojson::{
    self, go_struct, Any, Decode, Encode, GoMap, GoSlice, Ptr, Raw, Reader, TypeError,
};
use crate::format::gotime::GoTime;

mod apply;
mod events;
mod state;

use apply::*;
use events::*;
pub use state::*;

/// One element of the event log as the engine reads it (timebox's `Event`; `data` stays raw until an
/// applier decodes it into its own type, so the data of an event no applier reads is only passed over).
/// The older compact form lacks `sequence` and `aggregate_id`.
struct Envelope<'a> {
    timestamp: GoTime,
    kind: String,
    /// `None` when the element has no `data` at all (decoding it then fails, so the event is skipped).
    data: Option<Raw<'a>>,
}

impl<'a> Envelope<'a> {
    fn read(mut r: Reader<'a>) -> Result<Envelope<'a>, TypeError> {
        let mut event = Envelope {
            timestamp: GoTime::default(),
            kind: String::new(),
            data: None,
        };
        if r.null() {
            return Ok(event);
        }
        if !r.object() {
            let what = match r.kind() {
                "array" => "an array",
                "string" => "a string",
                _ => "a scalar",
            };
            return Err(TypeError(format!("cannot unmarshal {what} into an event")));
        }
        let fields = ["timestamp", "sequence", "type", "aggregate_id", "data"];
        while let Some(key) = r.key()? {
            let key = key.text();
            let field = fields
                .iter()
                .position(|f| key == *f)
                .or_else(|| fields.iter().position(|f| gojson::names_field(&key, f)));
            match field {
                Some(0) => event.timestamp.decode(&mut r)?,
                Some(1) => i64::accepts(&mut r)?,
                Some(2) => event.kind.decode(&mut r)?,
                Some(3) => GoSlice::<String>::accepts(&mut r)?,
                Some(4) => event.data = Some(r.skip()?),
                _ => {
                    r.skip()?;
                }
            }
        }
        Ok(event)
    }

    /// The event's data decoded into `T`, or `None` where the engine skips the event.
    fn data<T: Decode + Default>(&mut self) -> Option<T> {
        let mut out = T::default();
        out.decode(&mut self.data.take()?.reader()).ok()?;
        Some(out)
    }

    /// Whether the event's data decodes into `T` (the engine does not skip the event), keeping none of
    /// it.
    fn data_fits<T: Decode>(&self) -> bool {
        self.data
            .is_some_and(|data| T::accepts(&mut data.reader()).is_ok())
    }
}

/// Why the engine cannot answer a flow's state (it answers HTTP 500).
#[derive(Debug, PartialEq)]
pub struct FoldError(pub String);

impl std::fmt::Display for FoldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn panics(what: String) -> FoldError {
    FoldError(format!("the engine cannot load it: {what}"))
}

/// `snapshot:seq` as the engine uses it: how many events the snapshot folded in. The engine reads it
/// with Lua's `tonumber`, which also takes spaces, hex and exponents; only surrounding spaces and a
/// plain non-negative integer are taken here, and anything else refused rather than guessed at.
pub fn parse_seq(raw: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(raw)
        .ok()
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()))
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| {
            format!(
                "snapshot sequence {:?} is not a count of events",
                gojson::bounded(&String::from_utf8_lossy(raw))
            )
        })
}

/// What one event log element says for eligibility: when it happened and, for the two event types that
/// move the engine's status index, the status it set.
pub struct EventFacts {
    pub unix_ms: i64,
    pub sets_status: Option<String>,
}

/// Reads an event's timestamp and the status it sets in the engine's status index (`flow_started`:
/// `active`; `flow_deactivated`: its `status`), as the engine's indexer reads it. An element the engine
/// could not read as an event is an error.
///
/// Run on the server's main thread, so it takes a bounded amount of work per byte and builds nothing
/// but the status it answers: the element is checked as JSON, its fields but `timestamp`, `type` and
/// `data` are passed over, and only the data of those two types is read (a `flow_started`'s only to
/// see that it decodes, as the indexer requires). Callers measure the element against the flow's cap
/// before they call this.
pub fn event_facts(element: &[u8]) -> Result<EventFacts, FoldError> {
    let doc = gojson::check(element).map_err(|e| FoldError(format!("not JSON: {e}")))?;
    let mut event = Envelope::read(doc).map_err(|e| FoldError(format!("unreadable: {e}")))?;
    let sets_status = match event.kind.as_str() {
        "flow_started" => event
            .data_fits::<FlowStarted>()
            .then(|| "active".to_string()),
        "flow_deactivated" => event.data::<FlowDeactivated>().map(|d| d.status),
        _ => None,
    };
    Ok(EventFacts {
        unix_ms: event.timestamp.unix_ms(),
        sets_status,
    })
}

/// The state the engine answers for a flow whose stored snapshot is `snapshot` (absent or empty: none),
/// read from the `skip`th event on (`snapshot:seq`, 0 without one): the JSON the engine's
/// `GET /engine/flow/{id}` writes, or `None` where the engine answers 404 (no id).
pub fn fold<E: AsRef<[u8]>>(
    snapshot: Option<&[u8]>,
    skip: usize,
    events: impl IntoIterator<Item = E>,
) -> Result<Option<Vec<u8>>, FoldError> {
    let mut state = Some(Box::new(FlowState {
        attributes: GoMap::empty(),
        executions: GoMap::empty(),
        ..FlowState::default()
    }));
    if let Some(snapshot) = snapshot.filter(|s| !s.is_empty()) {
        let mut doc = gojson::check(snapshot)
            .map_err(|e| FoldError(format!("the snapshot is not JSON: {e}")))?;
        state
            .decode(&mut doc)
            .map_err(|e| FoldError(format!("the snapshot is unreadable: {e}")))?;
    }
    for (i, element) in events.into_iter().enumerate().skip(skip) {
        let doc = gojson::check(element.as_ref())
            .map_err(|e| FoldError(format!("event {i} is not JSON: {e}")))?;
        let mut event =
            Envelope::read(doc).map_err(|e| FoldError(format!("event {i} is unreadable: {e}")))?;
        apply(&mut state, &mut event)
            .map_err(|why| panics(format!("event {i} ({}) {why}", event.kind)))?;
    }
    let Some(state) = state else {
        return Err(panics("the snapshot is null".into()));
    };
    if state.id.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::new();
    state
        .encode(&mut out)
        .map_err(|e| FoldError(format!("the engine cannot write its state: {e}")))?;
    Ok(Some(out))
}

#[cfg(test)]
mod tests;
