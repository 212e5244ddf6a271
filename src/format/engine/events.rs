//! The data of each event type the engine applies, as Go declares it.

use super::*;

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
