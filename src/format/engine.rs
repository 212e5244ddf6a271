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

/// `Args`: named values passed to and from steps.
pub type Args = GoMap<Any>;

go_struct! {
    /// `api.FlowState`, what `GET /engine/flow/{id}` answers.
    pub struct FlowState {
        created_at: GoTime = "created_at",
        completed_at: GoTime = "completed_at",
        last_updated: GoTime = "last_updated",
        plan: Ptr<ExecutionPlan> = "plan",
        metadata: GoMap<Any> = "metadata" omitempty,
        labels: GoMap<String> = "labels" omitempty,
        attributes: GoMap<Ptr<AttributeValue>> = "attributes",
        deactivated_at: GoTime = "deactivated_at",
        executions: GoMap<Ptr<ExecutionState>> = "executions",
        id: String = "id",
        status: String = "status",
        error: String = "error" omitempty,
    }
}

go_struct! {
    pub struct AttributeValue {
        value: Any = "value",
        step: String = "step" omitempty,
        set_at: GoTime = "set_at",
    }
}

go_struct! {
    pub struct ExecutionState {
        started_at: GoTime = "started_at",
        completed_at: GoTime = "completed_at",
        inputs: Args = "inputs",
        outputs: Args = "outputs" omitempty,
        status: String = "status",
        error: String = "error" omitempty,
        duration: i64 = "duration" omitempty,
        work_items: GoMap<Ptr<WorkState>> = "work_items" omitempty,
    }
}

go_struct! {
    pub struct WorkState {
        status: String = "status",
        started_at: GoTime = "started_at",
        completed_at: GoTime = "completed_at",
        inputs: Args = "inputs",
        outputs: Args = "outputs" omitempty,
        error: String = "error" omitempty,
        retry_count: i64 = "retry_count" omitempty,
        next_retry_at: GoTime = "next_retry_at",
    }
}

go_struct! {
    pub struct ExecutionPlan {
        goals: GoSlice<String> = "goals",
        required: GoSlice<String> = "required",
        steps: GoMap<Ptr<Step>> = "steps",
        attributes: GoMap<Ptr<AttributeEdges>> = "attributes",
        excluded: ExcludedSteps = "excluded",
    }
}

go_struct! {
    pub struct ExcludedSteps {
        satisfied: GoMap<GoSlice<String>> = "satisfied" omitempty,
        missing: GoMap<GoSlice<String>> = "missing" omitempty,
    }
}

go_struct! {
    pub struct AttributeEdges {
        providers: GoSlice<String> = "providers",
        consumers: GoSlice<String> = "consumers",
    }
}

go_struct! {
    pub struct Step {
        id: String = "id",
        name: String = "name",
        labels: GoMap<String> = "labels" omitempty,
        kind: String = "type",
        attributes: GoMap<Ptr<AttributeSpec>> = "attributes",
        predicate: Ptr<ScriptConfig> = "predicate" omitempty,
        work_config: Ptr<WorkConfig> = "work_config" omitempty,
        memoizable: bool = "memoizable" omitempty,
        http: Ptr<HttpConfig> = "http" omitempty,
        script: Ptr<ScriptConfig> = "script" omitempty,
        flow: Ptr<FlowConfig> = "flow" omitempty,
    }
}

go_struct! {
    pub struct HttpConfig {
        endpoint: String = "endpoint",
        health_check: String = "health_check" omitempty,
        timeout: i64 = "timeout",
    }
}

go_struct! {
    pub struct ScriptConfig {
        language: String = "language",
        script: String = "script",
    }
}

go_struct! {
    pub struct FlowConfig {
        goals: GoSlice<String> = "goals",
    }
}

go_struct! {
    pub struct WorkConfig {
        max_retries: i64 = "max_retries" omitempty,
        init_backoff: i64 = "init_backoff" omitempty,
        max_backoff: i64 = "max_backoff" omitempty,
        backoff_type: String = "backoff_type" omitempty,
        parallelism: i64 = "parallelism" omitempty,
    }
}

go_struct! {
    pub struct AttributeSpec {
        role: String = "role",
        kind: String = "type",
        mapping: Ptr<AttributeMapping> = "mapping" omitempty,
        for_each: bool = "for_each" omitempty,
        default: String = "default" omitempty,
        timeout: i64 = "timeout" omitempty,
    }
}

go_struct! {
    pub struct AttributeMapping {
        name: String = "name" omitempty,
        script: Ptr<ScriptConfig> = "script" omitempty,
    }
}

// ---------------------------------------------------------------- events

go_struct! {
    pub struct FlowStarted {
        plan: Ptr<ExecutionPlan> = "plan",
        init: Args = "init",
        metadata: GoMap<Any> = "metadata" omitempty,
        labels: GoMap<String> = "labels" omitempty,
        flow_id: String = "flow_id",
    }
}

go_struct! {
    pub struct FlowCompleted {
        result: Args = "result",
        flow_id: String = "flow_id",
    }
}

go_struct! {
    pub struct FlowFailed {
        flow_id: String = "flow_id",
        error: String = "error",
    }
}

go_struct! {
    pub struct StepStarted {
        inputs: Args = "inputs",
        flow_id: String = "flow_id",
        step_id: String = "step_id",
        work_items: GoMap<Args> = "work_items",
    }
}

go_struct! {
    pub struct StepCompleted {
        outputs: Args = "outputs",
        flow_id: String = "flow_id",
        step_id: String = "step_id",
        duration: i64 = "duration",
    }
}

go_struct! {
    /// `step_failed`; `step_skipped` has `reason` where this has `error`.
    pub struct StepFailed {
        flow_id: String = "flow_id",
        step_id: String = "step_id",
        error: String = "error",
    }
}

go_struct! {
    pub struct StepSkipped {
        flow_id: String = "flow_id",
        step_id: String = "step_id",
        reason: String = "reason",
    }
}

go_struct! {
    pub struct AttributeSet {
        value: Any = "value",
        flow_id: String = "flow_id",
        step_id: String = "step_id",
        key: String = "key",
    }
}

go_struct! {
    pub struct WorkStarted {
        flow_id: String = "flow_id",
        step_id: String = "step_id",
        token: String = "token",
        inputs: Args = "inputs",
    }
}

go_struct! {
    pub struct WorkSucceeded {
        flow_id: String = "flow_id",
        step_id: String = "step_id",
        token: String = "token",
        outputs: Args = "outputs",
    }
}

go_struct! {
    pub struct WorkFailed {
        flow_id: String = "flow_id",
        step_id: String = "step_id",
        token: String = "token",
        error: String = "error",
    }
}

go_struct! {
    pub struct WorkNotCompleted {
        flow_id: String = "flow_id",
        step_id: String = "step_id",
        token: String = "token",
        retry_token: String = "retry_token" omitempty,
        error: String = "error",
    }
}

go_struct! {
    pub struct RetryScheduled {
        flow_id: String = "flow_id",
        step_id: String = "step_id",
        token: String = "token",
        retry_count: i64 = "retry_count",
        next_retry_at: GoTime = "next_retry_at",
        error: String = "error",
    }
}

go_struct! {
    pub struct FlowDeactivated {
        flow_id: String = "flow_id",
        status: String = "status",
    }
}

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
    events: &[E],
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
    for (i, element) in events.iter().enumerate().skip(skip) {
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

/// What makes an applier panic in the engine.
type Applied = Result<(), String>;

/// Applies one event as the engine's applier for its type does; events without one are skipped.
fn apply(slot: &mut Option<Box<FlowState>>, event: &mut Envelope) -> Applied {
    let at = event.timestamp;
    if event.kind == "flow_started" {
        if let Some(data) = event.data::<FlowStarted>() {
            *slot = Some(Box::new(started(data, at)?));
        }
        return Ok(());
    }
    macro_rules! with_data {
        ($ty:ty, $apply:expr) => {{
            let Some(data) = event.data::<$ty>() else {
                return Ok(());
            };
            let st = slot.as_deref_mut().ok_or("applied to a null state")?;
            #[allow(clippy::redundant_closure_call)]
            ($apply)(st, data)
        }};
    }
    match event.kind.clone().as_str() {
        "flow_completed" => with_data!(FlowCompleted, |st: &mut FlowState, _| {
            st.status = "completed".into();
            st.completed_at = at;
            st.last_updated = at;
            Ok(())
        }),
        "flow_failed" => with_data!(FlowFailed, |st: &mut FlowState, d: FlowFailed| {
            st.status = "failed".into();
            st.error = d.error;
            st.completed_at = at;
            st.last_updated = at;
            Ok(())
        }),
        "flow_deactivated" => with_data!(FlowDeactivated, |st: &mut FlowState, _| {
            st.deactivated_at = at;
            st.last_updated = at;
            Ok(())
        }),
        "step_started" => with_data!(StepStarted, |st: &mut FlowState, d: StepStarted| {
            let work_items = d.work_items.0.map(|items| {
                items
                    .into_iter()
                    .map(|(token, inputs)| {
                        let item = WorkState {
                            status: "pending".into(),
                            inputs,
                            ..WorkState::default()
                        };
                        (token, Some(Box::new(item)))
                    })
                    .collect()
            });
            let exec = ExecutionState {
                status: "active".into(),
                started_at: at,
                inputs: d.inputs,
                work_items: GoMap(Some(work_items.unwrap_or_default())),
                ..ExecutionState::default()
            };
            set_execution(st, d.step_id, exec)?;
            st.last_updated = at;
            Ok(())
        }),
        "step_completed" => with_data!(StepCompleted, |st: &mut FlowState, d: StepCompleted| {
            let exec = execution(st, &d.step_id)?;
            exec.status = "completed".into();
            exec.completed_at = at;
            exec.duration = d.duration;
            exec.outputs = d.outputs;
            st.last_updated = at;
            Ok(())
        }),
        "step_failed" => with_data!(StepFailed, |st: &mut FlowState, d: StepFailed| {
            end_step(st, &d.step_id, "failed", d.error, at)
        }),
        "step_skipped" => with_data!(StepSkipped, |st: &mut FlowState, d: StepSkipped| {
            end_step(st, &d.step_id, "skipped", d.reason, at)
        }),
        "attribute_set" => with_data!(AttributeSet, |st: &mut FlowState, d: AttributeSet| {
            let value = AttributeValue {
                value: d.value,
                step: d.step_id,
                set_at: at,
            };
            st.attributes
                .0
                .as_mut()
                .ok_or("assignment to entry in nil map (attributes)")?
                .insert(d.key, Some(Box::new(value)));
            st.last_updated = at;
            Ok(())
        }),
        "work_started" => with_data!(WorkStarted, |st: &mut FlowState, d: WorkStarted| {
            let item = work_item(execution(st, &d.step_id)?, &d.token)?
                .ok_or_else(|| format!("starts work item {:?} the step does not have", d.token))?;
            item.status = "active".into();
            if item.started_at.is_zero() {
                item.started_at = at;
            }
            st.last_updated = at;
            Ok(())
        }),
        "work_succeeded" => with_data!(WorkSucceeded, |st: &mut FlowState, d: WorkSucceeded| {
            let Some(item) = work_item(execution(st, &d.step_id)?, &d.token)? else {
                return Ok(());
            };
            item.status = "succeeded".into();
            item.completed_at = at;
            item.outputs = d.outputs;
            st.last_updated = at;
            Ok(())
        }),
        "work_failed" => with_data!(WorkFailed, |st: &mut FlowState, d: WorkFailed| {
            let Some(item) = work_item(execution(st, &d.step_id)?, &d.token)? else {
                return Ok(());
            };
            item.status = "failed".into();
            item.completed_at = at;
            item.error = d.error;
            st.last_updated = at;
            Ok(())
        }),
        "work_not_completed" => with_data!(
            WorkNotCompleted,
            |st: &mut FlowState, d: WorkNotCompleted| {
                let exec = execution(st, &d.step_id)?;
                let Some(item) = work_item(exec, &d.token)? else {
                    return Ok(());
                };
                item.status = "not_completed".into();
                item.completed_at = at;
                item.error = d.error;
                if !d.retry_token.is_empty() && d.retry_token != d.token {
                    // The item moves to its retry token.
                    if let Some(items) = exec.work_items.0.as_mut() {
                        let moved = items.remove(&d.token).flatten();
                        items.insert(d.retry_token, moved);
                    }
                }
                st.last_updated = at;
                Ok(())
            }
        ),
        "retry_scheduled" => with_data!(RetryScheduled, |st: &mut FlowState, d: RetryScheduled| {
            let Some(item) = work_item(execution(st, &d.step_id)?, &d.token)? else {
                return Ok(());
            };
            item.status = "pending".into();
            item.retry_count = d.retry_count;
            item.next_retry_at = d.next_retry_at;
            item.error = d.error;
            st.last_updated = at;
            Ok(())
        }),
        _ => Ok(()),
    }
}

/// `flow_started`: a new state from the event alone.
fn started(d: FlowStarted, at: GoTime) -> Result<FlowState, String> {
    let plan = d
        .plan
        .ok_or("starts a flow without a plan (nil pointer dereference)")?;
    let executions = plan
        .steps
        .0
        .iter()
        .flat_map(|steps| steps.keys())
        .map(|step| {
            let exec = ExecutionState {
                status: "pending".into(),
                work_items: GoMap::empty(),
                ..ExecutionState::default()
            };
            (step.clone(), Some(Box::new(exec)))
        })
        .collect();
    let attributes = d
        .init
        .0
        .into_iter()
        .flatten()
        .map(|(name, value)| {
            let attr = AttributeValue {
                value,
                step: String::new(),
                set_at: at,
            };
            (name, Some(Box::new(attr)))
        })
        .collect();
    Ok(FlowState {
        id: d.flow_id,
        status: "active".into(),
        plan: Some(plan),
        metadata: d.metadata,
        labels: d.labels,
        attributes: GoMap(Some(attributes)),
        executions: GoMap(Some(executions)),
        created_at: at,
        last_updated: at,
        ..FlowState::default()
    })
}

/// The execution of a step the flow has (the engine dereferences it unchecked).
fn execution<'s>(st: &'s mut FlowState, step: &str) -> Result<&'s mut ExecutionState, String> {
    st.executions
        .0
        .as_mut()
        .and_then(|execs| execs.get_mut(step))
        .and_then(|exec| exec.as_deref_mut())
        .ok_or_else(|| format!("names step {step:?} the flow does not have"))
}

/// A step's work item: `None` when the step does not know the token (the engine then ignores the
/// event), an error when it knows it as nil.
fn work_item<'e>(
    exec: &'e mut ExecutionState,
    token: &str,
) -> Result<Option<&'e mut WorkState>, String> {
    match exec
        .work_items
        .0
        .as_mut()
        .and_then(|items| items.get_mut(token))
    {
        None => Ok(None),
        Some(Some(item)) => Ok(Some(item)),
        Some(None) => Err(format!("names work item {token:?}, which is null")),
    }
}

fn set_execution(st: &mut FlowState, step: String, exec: ExecutionState) -> Applied {
    st.executions
        .0
        .as_mut()
        .ok_or("assignment to entry in nil map (executions)")?
        .insert(step, Some(Box::new(exec)));
    Ok(())
}

/// `step_failed` and `step_skipped`: the step ends with `status` and `error`.
fn end_step(st: &mut FlowState, step: &str, status: &str, error: String, at: GoTime) -> Applied {
    let exec = execution(st, step)?;
    exec.status = status.into();
    exec.error = error;
    exec.completed_at = at;
    st.last_updated = at;
    Ok(())
}

#[cfg(test)]
mod tests;
