//! The engine's appliers: how each event type changes the state (`Apply`), and `flow_started`'s new
//! state.

use super::*;

/// What makes an applier panic in the engine.
pub(super) type Applied = Result<(), String>;

/// Applies one event as the engine's applier for its type does; events without one are skipped.
pub(super) fn apply(slot: &mut Option<Box<FlowState>>, event: &mut Envelope) -> Applied {
    let at = event.timestamp;
    if event.kind == "flow_started" {
        if let Some(data) = event.data::<FlowStarted>() {
            *slot = Some(Box::new(started(data, at)?));
        }
        return Ok(());
    }
    match event.kind.clone().as_str() {
        "flow_completed" => applied::<FlowCompleted>(slot, event, at),
        "flow_failed" => applied::<FlowFailed>(slot, event, at),
        "flow_deactivated" => applied::<FlowDeactivated>(slot, event, at),
        "step_started" => applied::<StepStarted>(slot, event, at),
        "step_completed" => applied::<StepCompleted>(slot, event, at),
        "step_failed" => applied::<StepFailed>(slot, event, at),
        "step_skipped" => applied::<StepSkipped>(slot, event, at),
        "attribute_set" => applied::<AttributeSet>(slot, event, at),
        "work_started" => applied::<WorkStarted>(slot, event, at),
        "work_succeeded" => applied::<WorkSucceeded>(slot, event, at),
        "work_failed" => applied::<WorkFailed>(slot, event, at),
        "work_not_completed" => applied::<WorkNotCompleted>(slot, event, at),
        "retry_scheduled" => applied::<RetryScheduled>(slot, event, at),
        _ => Ok(()),
    }
}

/// An event's data, applied to the state as the engine's applier for its type applies it.
pub(super) trait Apply: Decode + Default {
    fn apply(self, st: &mut FlowState, at: GoTime) -> Applied;
}

/// Applies `T`'s data, if the event's data decodes as `T` (else the event is skipped, as the engine
/// skips it), to a state that must exist.
pub(super) fn applied<T: Apply>(
    slot: &mut Option<Box<FlowState>>,
    event: &mut Envelope,
    at: GoTime,
) -> Applied {
    let Some(data) = event.data::<T>() else {
        return Ok(());
    };
    data.apply(slot.as_deref_mut().ok_or("applied to a null state")?, at)
}

/// `flow_completed`.
impl Apply for FlowCompleted {
    fn apply(self, st: &mut FlowState, at: GoTime) -> Applied {
        st.status = "completed".into();
        st.completed_at = at;
        st.last_updated = at;
        Ok(())
    }
}

/// `flow_failed`.
impl Apply for FlowFailed {
    fn apply(self, st: &mut FlowState, at: GoTime) -> Applied {
        st.status = "failed".into();
        st.error = self.error;
        st.completed_at = at;
        st.last_updated = at;
        Ok(())
    }
}

/// `flow_deactivated`.
impl Apply for FlowDeactivated {
    fn apply(self, st: &mut FlowState, at: GoTime) -> Applied {
        st.deactivated_at = at;
        st.last_updated = at;
        Ok(())
    }
}

/// `step_started`.
impl Apply for StepStarted {
    fn apply(self, st: &mut FlowState, at: GoTime) -> Applied {
        let work_items = self.work_items.0.map(|items| {
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
            inputs: self.inputs,
            work_items: GoMap(Some(work_items.unwrap_or_default())),
            ..ExecutionState::default()
        };
        set_execution(st, self.step_id, exec)?;
        st.last_updated = at;
        Ok(())
    }
}

/// `step_completed`.
impl Apply for StepCompleted {
    fn apply(self, st: &mut FlowState, at: GoTime) -> Applied {
        let exec = execution(st, &self.step_id)?;
        exec.status = "completed".into();
        exec.completed_at = at;
        exec.duration = self.duration;
        exec.outputs = self.outputs;
        st.last_updated = at;
        Ok(())
    }
}

/// `step_failed`.
impl Apply for StepFailed {
    fn apply(self, st: &mut FlowState, at: GoTime) -> Applied {
        end_step(st, &self.step_id, "failed", self.error, at)
    }
}

/// `step_skipped`.
impl Apply for StepSkipped {
    fn apply(self, st: &mut FlowState, at: GoTime) -> Applied {
        end_step(st, &self.step_id, "skipped", self.reason, at)
    }
}

/// `attribute_set`.
impl Apply for AttributeSet {
    fn apply(self, st: &mut FlowState, at: GoTime) -> Applied {
        let value = AttributeValue {
            value: self.value,
            step: self.step_id,
            set_at: at,
        };
        st.attributes
            .0
            .as_mut()
            .ok_or("assignment to entry in nil map (attributes)")?
            .insert(self.key, Some(Box::new(value)));
        st.last_updated = at;
        Ok(())
    }
}

/// `work_started`.
impl Apply for WorkStarted {
    fn apply(self, st: &mut FlowState, at: GoTime) -> Applied {
        let item = work_item(execution(st, &self.step_id)?, &self.token)?
            .ok_or_else(|| format!("starts work item {:?} the step does not have", self.token))?;
        item.status = "active".into();
        if item.started_at.is_zero() {
            item.started_at = at;
        }
        st.last_updated = at;
        Ok(())
    }
}

/// `work_succeeded`.
impl Apply for WorkSucceeded {
    fn apply(self, st: &mut FlowState, at: GoTime) -> Applied {
        let Some(item) = work_item(execution(st, &self.step_id)?, &self.token)? else {
            return Ok(());
        };
        item.status = "succeeded".into();
        item.completed_at = at;
        item.outputs = self.outputs;
        st.last_updated = at;
        Ok(())
    }
}

/// `work_failed`.
impl Apply for WorkFailed {
    fn apply(self, st: &mut FlowState, at: GoTime) -> Applied {
        let Some(item) = work_item(execution(st, &self.step_id)?, &self.token)? else {
            return Ok(());
        };
        item.status = "failed".into();
        item.completed_at = at;
        item.error = self.error;
        st.last_updated = at;
        Ok(())
    }
}

/// `work_not_completed`.
impl Apply for WorkNotCompleted {
    fn apply(self, st: &mut FlowState, at: GoTime) -> Applied {
        let exec = execution(st, &self.step_id)?;
        let Some(item) = work_item(exec, &self.token)? else {
            return Ok(());
        };
        item.status = "not_completed".into();
        item.completed_at = at;
        item.error = self.error;
        if !self.retry_token.is_empty() && self.retry_token != self.token {
            // The item moves to its retry token.
            if let Some(items) = exec.work_items.0.as_mut() {
                let moved = items.remove(&self.token).flatten();
                items.insert(self.retry_token, moved);
            }
        }
        st.last_updated = at;
        Ok(())
    }
}

/// `retry_scheduled`.
impl Apply for RetryScheduled {
    fn apply(self, st: &mut FlowState, at: GoTime) -> Applied {
        let Some(item) = work_item(execution(st, &self.step_id)?, &self.token)? else {
            return Ok(());
        };
        item.status = "pending".into();
        item.retry_count = self.retry_count;
        item.next_retry_at = self.next_retry_at;
        item.error = self.error;
        st.last_updated = at;
        Ok(())
    }
}

/// `flow_started`: a new state from the event alone.
pub(super) fn started(d: FlowStarted, at: GoTime) -> Result<FlowState, String> {
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
pub(super) fn execution<'s>(
    st: &'s mut FlowState,
    step: &str,
) -> Result<&'s mut ExecutionState, String> {
    st.executions
        .0
        .as_mut()
        .and_then(|execs| execs.get_mut(step))
        .and_then(|exec| exec.as_deref_mut())
        .ok_or_else(|| format!("names step {step:?} the flow does not have"))
}

/// A step's work item: `None` when the step does not know the token (the engine then ignores the
/// event), an error when it knows it as nil.
pub(super) fn work_item<'e>(
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

pub(super) fn set_execution(st: &mut FlowState, step: String, exec: ExecutionState) -> Applied {
    st.executions
        .0
        .as_mut()
        .ok_or("assignment to entry in nil map (executions)")?
        .insert(step, Some(Box::new(exec)));
    Ok(())
}

/// `step_failed` and `step_skipped`: the step ends with `status` and `error`.
pub(super) fn end_step(
    st: &mut FlowState,
    step: &str,
    status: &str,
    error: String,
    at: GoTime,
) -> Applied {
    let exec = execution(st, step)?;
    exec.status = status.into();
    exec.error = error;
    exec.completed_at = at;
    st.last_updated = at;
    Ok(())
}
