//! The engine's `FlowState` and the types inside it, as Go declares them (field names, JSON tags,
//! `omitempty`), so that the state written here is the engine's byte for byte.

use super::*;

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
