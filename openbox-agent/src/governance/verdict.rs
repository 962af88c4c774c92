//! What Core's answers mean (protocol §4, §5): verdict parsing, the evaluate response, the
//! decision for an activity stage, redaction descriptions and approval-poll outcomes.
//!
//! Everything here is a pure function of JSON values: no I/O, no clocks (the current time
//! is a parameter), so the whole table of cases is unit-tested.
//!
//! Decision order is **SDK 1.0's** (§4.2): BLOCK/HALT, then guardrails failure, then
//! REQUIRE_APPROVAL, then redaction. Error type names are **SDK 2.0's**: `GovernanceBlock`
//! for BLOCK and `GovernanceHalt` for HALT (SDK 1.0 used `GovernanceStop` for both), so a
//! workflow can tell the two apart. The agent does not terminate the workflow on HALT (it
//! holds no Temporal client): a BLOCK/HALT decision carries the verdict's own `reason`,
//! and a hook under SDK 2.0 conventions terminates the workflow with it; under SDK 1.0
//! conventions HALT only fails the activity. Messages are SDK 1.0's texts
//! (`Governance blocked: <reason>` for both). A BLOCK with a valid `patch` (§8) also
//! carries the `GovernancePatch` details, which only a hook under SDK 2.0 conventions acts
//! on.

use serde::Serialize;
use serde_json::{Map, Value};

use super::conventions::Conventions;

/// The five verdicts, ordered by priority (§4.1): `Allow < Constrain < RequireApproval <
/// Block < Halt`, so `max()` aggregates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Constrain,
    RequireApproval,
    Block,
    Halt,
}

impl Verdict {
    /// §4.1 parsing: lowercase, `-`→`_`, `continue`→ALLOW, `stop`→HALT,
    /// `require_approval`/`request_approval`→REQUIRE_APPROVAL. Unknown text → ALLOW.
    pub fn parse(text: &str) -> Verdict {
        Self::parse_known(text).unwrap_or(Verdict::Allow)
    }

    /// Like [`Verdict::parse`] but `None` for text that names no verdict.
    pub fn parse_known(text: &str) -> Option<Verdict> {
        let normalized = text.trim().to_lowercase().replace('-', "_");
        Some(match normalized.as_str() {
            "allow" | "continue" => Verdict::Allow,
            "constrain" => Verdict::Constrain,
            "require_approval" | "request_approval" => Verdict::RequireApproval,
            "block" => Verdict::Block,
            "halt" | "stop" => Verdict::Halt,
            _ => return None,
        })
    }

    /// HALT 5 > BLOCK 4 > REQUIRE_APPROVAL 3 > CONSTRAIN 2 > ALLOW 1.
    pub fn priority(self) -> u8 {
        self as u8 + 1
    }

    /// The most severe of several verdicts; ALLOW when there are none.
    pub fn highest(verdicts: impl IntoIterator<Item = Verdict>) -> Verdict {
        verdicts.into_iter().max().unwrap_or(Verdict::Allow)
    }

    /// BLOCK or HALT.
    pub fn should_stop(self) -> bool {
        matches!(self, Verdict::Block | Verdict::Halt)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Constrain => "constrain",
            Verdict::RequireApproval => "require_approval",
            Verdict::Block => "block",
            Verdict::Halt => "halt",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The decision field of a response: `primary`, or `secondary` only when `primary` is
/// missing, null, empty or not a string (the SDK's `data.get(a) or data.get(b)`).
/// `None` when neither holds text.
fn verdict_text<'a>(
    obj: &'a Map<String, Value>,
    primary: &str,
    secondary: &str,
) -> Option<&'a str> {
    let text = |key: &str| {
        obj.get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    text(primary).or_else(|| text(secondary))
}

fn opt_string(obj: &Map<String, Value>, key: &str) -> Option<String> {
    obj.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn opt_f64(obj: &Map<String, Value>, key: &str) -> Option<f64> {
    match obj.get(key)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Python truthiness of a JSON value (`if data.get("expired")`).
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// One entry of `guardrails_result.reasons`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GuardrailReason {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub field: Option<String>,
    pub reason: Option<String>,
}

/// `guardrails_result` (§4.1). Lenient: wrong types become the defaults.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GuardrailsResult {
    /// `"activity_input"` or `"activity_output"`; empty when missing.
    pub input_type: String,
    /// `None` when missing or null (both mean "nothing to redact", §4.3).
    pub redacted_input: Option<Value>,
    pub raw_logs: Option<Value>,
    /// Default true. Only an explicit `false` (or `0`) fails validation.
    pub validation_passed: bool,
    pub reasons: Vec<GuardrailReason>,
}

impl GuardrailsResult {
    pub fn from_value(v: &Value) -> Option<GuardrailsResult> {
        let obj = v.as_object().filter(|o| !o.is_empty())?;
        let validation_passed = match obj.get("validation_passed") {
            Some(Value::Bool(b)) => *b,
            Some(Value::Number(n)) => n.as_f64() != Some(0.0),
            _ => true,
        };
        let reasons = obj
            .get("reasons")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(Value::as_object)
                    .map(|r| GuardrailReason {
                        kind: opt_string(r, "type"),
                        field: opt_string(r, "field"),
                        reason: opt_string(r, "reason"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(GuardrailsResult {
            input_type: opt_string(obj, "input_type").unwrap_or_default(),
            redacted_input: obj.get("redacted_input").filter(|v| !v.is_null()).cloned(),
            raw_logs: obj.get("raw_logs").filter(|v| !v.is_null()).cloned(),
            validation_passed,
            reasons,
        })
    }

    /// The non-empty `reason` texts joined with `"; "`, or `default` when there are none.
    pub fn failure_message(&self, default: &str) -> String {
        let reasons: Vec<&str> = self
            .reasons
            .iter()
            .filter_map(|r| r.reason.as_deref())
            .filter(|r| !r.is_empty())
            .collect();
        if reasons.is_empty() {
            default.to_owned()
        } else {
            reasons.join("; ")
        }
    }
}

/// The evaluate response (§4.1), parsed leniently: a field of the wrong type is treated as
/// missing, never a panic or an error.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvaluateResponse {
    pub verdict: Verdict,
    pub reason: Option<String>,
    pub policy_id: Option<String>,
    pub governance_event_id: Option<String>,
    pub trust_tier: Option<String>,
    pub approval_id: Option<String>,
    pub risk_score: f64,
    pub alignment_score: Option<f64>,
    pub behavioral_violations: Option<Vec<String>>,
    pub constraints: Option<Vec<Value>>,
    pub metadata: Option<Map<String, Value>>,
    /// `guardrails_result`, or (SDK 2.0) `guardrails`.
    pub guardrails: Option<GuardrailsResult>,
    pub approval_expiration_time: Option<String>,
    /// `patch.new_input` when the response carries a patch that keeps §8's rules
    /// (`Some(Value::Null)` is the valid "keep the original input"); `None` when there is
    /// no patch or it breaks a rule (then it is ignored, never an error, as in SDK 2.0).
    pub patch: Option<Value>,
}

/// The largest integer a patch may carry: JavaScript's safe range (§8).
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// `patch.new_input` if `patch` is an object whose only key is `new_input`, which is not a
/// bool and whose numbers (at any depth) are finite and, when integral, within ±(2^53−1).
fn patch_new_input(obj: &Map<String, Value>) -> Option<Value> {
    let patch = obj.get("patch")?.as_object()?;
    if patch.len() != 1 {
        return None;
    }
    let new_input = patch.get("new_input")?;
    if new_input.is_boolean() || !numbers_are_safe(new_input) {
        return None;
    }
    Some(new_input.clone())
}

fn numbers_are_safe(v: &Value) -> bool {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.unsigned_abs() <= MAX_SAFE_INTEGER as u64
            } else if let Some(u) = n.as_u64() {
                u <= MAX_SAFE_INTEGER as u64
            } else {
                n.as_f64().is_some_and(|f| {
                    f.is_finite() && (f.fract() != 0.0 || f.abs() <= MAX_SAFE_INTEGER)
                })
            }
        }
        Value::Array(items) => items.iter().all(numbers_are_safe),
        Value::Object(fields) => fields.values().all(numbers_are_safe),
        _ => true,
    }
}

/// What a BLOCK with a valid patch sends to the workflow (§8): the single `details` entry
/// of the `GovernancePatch` error, every field explicit.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PatchRequest {
    pub schema_version: u32,
    pub new_input: Value,
    pub governance_event_id: Option<String>,
    pub reason: Option<String>,
    pub event_type: &'static str,
    pub hook_trigger: bool,
    pub hook_stage: Option<String>,
}

/// The envelope's version; SDK 2.0 refuses any other.
pub const PATCH_SCHEMA_VERSION: u32 = 1;

impl EvaluateResponse {
    /// `None` when the body is not a JSON object (the SDK then continues: its parse
    /// fails and it returns no verdict).
    pub fn from_value(v: &Value) -> Option<EvaluateResponse> {
        let obj = v.as_object()?;
        let verdict = verdict_text(obj, "verdict", "action").map_or(Verdict::Allow, Verdict::parse);
        let guardrails = ["guardrails_result", "guardrails"]
            .iter()
            .find_map(|k| obj.get(*k).and_then(GuardrailsResult::from_value));
        Some(EvaluateResponse {
            verdict,
            reason: opt_string(obj, "reason"),
            policy_id: opt_string(obj, "policy_id"),
            governance_event_id: opt_string(obj, "governance_event_id"),
            trust_tier: opt_string(obj, "trust_tier"),
            approval_id: opt_string(obj, "approval_id"),
            risk_score: opt_f64(obj, "risk_score").unwrap_or(0.0),
            alignment_score: opt_f64(obj, "alignment_score"),
            behavioral_violations: obj
                .get("behavioral_violations")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                }),
            constraints: obj.get("constraints").and_then(Value::as_array).cloned(),
            metadata: obj.get("metadata").and_then(Value::as_object).cloned(),
            guardrails,
            approval_expiration_time: opt_string(obj, "approval_expiration_time"),
            patch: patch_new_input(obj),
        })
    }

    /// A response with only a verdict and a reason (the fail_closed synthetic HALT, §6).
    pub fn synthetic(verdict: Verdict, reason: impl Into<String>) -> EvaluateResponse {
        EvaluateResponse {
            verdict,
            reason: Some(reason.into()),
            policy_id: None,
            governance_event_id: None,
            trust_tier: None,
            approval_id: None,
            risk_score: 0.0,
            alignment_score: None,
            behavioral_violations: None,
            constraints: None,
            metadata: None,
            guardrails: None,
            approval_expiration_time: None,
            patch: None,
        }
    }
}

/// `ApplicationError.type` values the hook raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ErrorType {
    GovernanceBlock,
    GovernanceHalt,
    GuardrailsValidationFailed,
    ApprovalPending,
    ApprovalRejected,
    ApprovalExpired,
    /// SDK 2.0's `OpenBoxAuthError`: Core refused an Okta / workload identity.
    OpenBoxAuthError,
}

impl ErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::GovernanceBlock => "GovernanceBlock",
            ErrorType::GovernanceHalt => "GovernanceHalt",
            ErrorType::GuardrailsValidationFailed => "GuardrailsValidationFailed",
            ErrorType::ApprovalPending => "ApprovalPending",
            ErrorType::ApprovalRejected => "ApprovalRejected",
            ErrorType::ApprovalExpired => "ApprovalExpired",
            ErrorType::OpenBoxAuthError => "OpenBoxAuthError",
        }
    }
}

/// One positional argument to redact (§4.3 input): the hook **merges** `value` into
/// argument `index` when that argument is a dataclass (recursively, only matching fields),
/// and otherwise **replaces** the argument with `value`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ArgRedaction {
    pub index: usize,
    pub value: Map<String, Value>,
}

/// What to change before the activity runs (input) or before its result is returned
/// (output). Serialized as `{"target":"input","args":[…]}` / `{"target":"output","value":…}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "target", rename_all = "snake_case")]
pub enum Redaction {
    /// Only the object entries of `redacted_input`, by position, below the argument count.
    Input { args: Vec<ArgRedaction> },
    /// Merge into a dataclass result when `value` is an object; otherwise replace the
    /// result with `value`.
    Output { value: Value },
}

impl Redaction {
    /// The redaction applied to the JSON form of the arguments (what ActivityCompleted
    /// reports as `activity_input`): an object argument gets the entry's keys merged in
    /// (recursively for nested objects, element-wise for lists, as the SDK's dataclass
    /// merge does); any other argument is replaced. The hook, which knows which arguments
    /// are dataclasses, may report its own serialized result instead.
    pub fn apply_to_input_json(&self, args: &mut [Value]) {
        if let Redaction::Input { args: entries } = self {
            for entry in entries {
                if let Some(arg) = args.get_mut(entry.index) {
                    match arg {
                        Value::Object(obj) => merge_object(obj, &entry.value),
                        _ => *arg = Value::Object(entry.value.clone()),
                    }
                }
            }
        }
    }

    /// The output redaction applied to the JSON form of the result.
    pub fn apply_to_output_json(&self, output: &mut Value) {
        if let Redaction::Output { value } = self {
            match (output, value) {
                (Value::Object(obj), Value::Object(patch)) => merge_object(obj, patch),
                (out, v) => *out = v.clone(),
            }
        }
    }
}

/// The SDK's `_deep_update_dataclass` on JSON: only keys the target already has; objects
/// recurse; lists update element-wise (objects merge, others replace) up to the shorter.
fn merge_object(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, new) in patch {
        let Some(current) = target.get_mut(key) else {
            continue;
        };
        match (current, new) {
            (Value::Object(cur), Value::Object(p)) => merge_object(cur, p),
            (Value::Array(cur), Value::Array(p)) => {
                for (c, n) in cur.iter_mut().zip(p) {
                    match (c, n) {
                        (Value::Object(co), Value::Object(no)) => merge_object(co, no),
                        (c, n) => *c = n.clone(),
                    }
                }
            }
            (cur, new) => *cur = new.clone(),
        }
    }
}

/// What the hook must do for an activity (serialized for the hook with an `action` tag).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Decision {
    /// Run the activity (Started) / return its result (Completed), after applying
    /// `redaction` if any. `verdict` is `None` when no verdict was obtained (skipped
    /// activity, event not sent, fail_open with Core unreachable). `constrained` is true
    /// for CONSTRAIN (logged only, like the SDK).
    Continue {
        verdict: Option<Verdict>,
        constrained: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        redaction: Option<Redaction>,
    },
    /// Raise `ApplicationError(message, type=error_type, non_retryable=non_retryable)`.
    Fail {
        error_type: ErrorType,
        message: String,
        non_retryable: bool,
        /// A BLOCK/HALT verdict's own reason: a hook that terminates the workflow on HALT
        /// (SDK 2.0) words the termination and its error from it.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// A BLOCK with a valid patch (§8): the `GovernancePatch` details. A hook following
        /// SDK 1.0 ignores it and raises the plain BLOCK.
        /// Boxed: rare, and large next to the other decisions.
        #[serde(skip_serializing_if = "Option::is_none")]
        patch: Option<Box<PatchRequest>>,
    },
    /// Raise the **retryable** `ApplicationError(message, type="ApprovalPending")`; the
    /// next attempt polls the approval (§5).
    ApprovalPending { message: String },
}

impl Decision {
    pub fn allow_without_verdict() -> Decision {
        Decision::Continue {
            verdict: None,
            constrained: false,
            redaction: None,
        }
    }

    /// Core refused the identity: the activity fails with `OpenBoxAuthError`, retryable
    /// as SDK 2.0's exception is (Temporal retries it under the activity's policy, so a
    /// corrected registration in Core lets the run go on), and never runs unchecked.
    pub fn auth_refused(message: String) -> Decision {
        Decision::Fail {
            error_type: ErrorType::OpenBoxAuthError,
            message,
            non_retryable: false,
            reason: None,
            patch: None,
        }
    }

    pub fn fail(error_type: ErrorType, message: impl Into<String>) -> Decision {
        Decision::Fail {
            error_type,
            message: message.into(),
            non_retryable: true,
            reason: None,
            patch: None,
        }
    }

    /// The `ApplicationError` the hook raises, or `None` to go on:
    /// `(type, message, non_retryable)`.
    pub fn error(&self) -> Option<(ErrorType, &str, bool)> {
        match self {
            Decision::Continue { .. } => None,
            Decision::Fail {
                error_type,
                message,
                non_retryable,
                ..
            } => Some((*error_type, message, *non_retryable)),
            Decision::ApprovalPending { message } => {
                Some((ErrorType::ApprovalPending, message, false))
            }
        }
    }
}

/// Which activity event a verdict answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// ActivityStarted, with the number of positional arguments (§4.3 step 2 bound).
    Started { arg_count: usize },
    /// ActivityCompleted (the activity already ran).
    Completed,
}

impl Stage {
    fn event_type(self) -> &'static str {
        match self {
            Stage::Started { .. } => super::events::ACTIVITY_STARTED,
            Stage::Completed => super::events::ACTIVITY_COMPLETED,
        }
    }
}

fn stop_error_type(verdict: Verdict) -> ErrorType {
    if verdict == Verdict::Halt {
        ErrorType::GovernanceHalt
    } else {
        ErrorType::GovernanceBlock
    }
}

/// The BLOCK/HALT failure (also used for a stored signal verdict).
pub fn stop_decision(verdict: Verdict, reason: &str) -> Decision {
    Decision::Fail {
        error_type: stop_error_type(verdict),
        message: format!("Governance blocked: {reason}"),
        non_retryable: true,
        reason: Some(reason.to_owned()),
        patch: None,
    }
}

/// §4.2 in SDK 1.0 order for one activity stage. `response` is `None` when there is no
/// verdict (fail_open failure, non-JSON answer): continue without redaction. `hitl` is
/// whether the approval flow applies to this activity (`hitl_enabled` and not in
/// `skip_hitl_activity_types`); without it REQUIRE_APPROVAL continues.
///
/// Guardrails *validation* is checked whatever `input_type` says (as SDK 1.0 does);
/// *redaction* uses a guardrails result only when its `input_type` matches the stage.
pub fn decide(stage: Stage, response: Option<&EvaluateResponse>, hitl: bool) -> Decision {
    let Some(r) = response else {
        return Decision::allow_without_verdict();
    };
    let completed = stage == Stage::Completed;
    if r.verdict.should_stop() {
        // Exactly BLOCK: HALT always drops the patch (§8).
        let patch = r
            .patch
            .as_ref()
            .filter(|_| r.verdict == Verdict::Block)
            .map(|new_input| {
                Box::new(PatchRequest {
                    schema_version: PATCH_SCHEMA_VERSION,
                    new_input: new_input.clone(),
                    governance_event_id: r.governance_event_id.clone(),
                    reason: r.reason.clone(),
                    event_type: stage.event_type(),
                    hook_trigger: false,
                    hook_stage: None,
                })
            });
        return Decision::Fail {
            error_type: stop_error_type(r.verdict),
            message: format!(
                "Governance blocked: {}",
                r.reason.as_deref().unwrap_or("No reason provided")
            ),
            non_retryable: true,
            // Core's own text, None when it gave none: SDK 2.0 words a HALT's default itself.
            reason: r.reason.clone(),
            patch,
        };
    }
    if let Some(g) = r.guardrails.as_ref().filter(|g| !g.validation_passed) {
        let default = if completed {
            "Guardrails output validation failed"
        } else {
            "Guardrails validation failed"
        };
        return Decision::fail(
            ErrorType::GuardrailsValidationFailed,
            format!(
                "Guardrails validation failed: {}",
                g.failure_message(default)
            ),
        );
    }
    if r.verdict == Verdict::RequireApproval && hitl {
        let message = if completed {
            format!(
                "Approval required for output: {}",
                r.reason
                    .as_deref()
                    .unwrap_or("Activity output requires human approval")
            )
        } else {
            format!(
                "Approval required: {}",
                r.reason
                    .as_deref()
                    .unwrap_or("Activity requires human approval")
            )
        };
        return Decision::ApprovalPending { message };
    }
    let redaction = r.guardrails.as_ref().and_then(|g| match stage {
        Stage::Started { arg_count } if g.input_type == "activity_input" => {
            input_redaction(g, arg_count)
        }
        Stage::Completed if g.input_type == "activity_output" => g
            .redacted_input
            .clone()
            .map(|value| Redaction::Output { value }),
        _ => None,
    });
    Decision::Continue {
        verdict: Some(r.verdict),
        constrained: r.verdict == Verdict::Constrain,
        redaction,
    }
}

/// §4.3 input steps 1–2: an object is a one-element list; a non-list is ignored; only
/// object entries below the argument count are kept.
fn input_redaction(g: &GuardrailsResult, arg_count: usize) -> Option<Redaction> {
    let entries: Vec<&Value> = match g.redacted_input.as_ref()? {
        v @ Value::Object(_) => vec![v],
        Value::Array(list) => list.iter().collect(),
        _ => return None,
    };
    let args: Vec<ArgRedaction> = entries
        .into_iter()
        .take(arg_count)
        .enumerate()
        .filter_map(|(index, v)| {
            v.as_object().map(|o| ArgRedaction {
                index,
                value: o.clone(),
            })
        })
        .collect();
    (!args.is_empty()).then_some(Redaction::Input { args })
}

/// The outcome of one approval poll (§5).
#[derive(Clone, Debug, PartialEq)]
pub enum ApprovalStatus {
    Approved,
    Rejected { reason: String },
    Expired,
    Pending,
}

/// Reads an approval poll answer (§5): expiry first (`expired` truthy, or
/// `approval_expiration_time` earlier than `now_unix`; an unparseable time is ignored),
/// then the decision. SDK 1.0 reads `verdict`, then `action`, and **both missing means
/// approved**; SDK 2.0 reads `action`, then `verdict`, and a missing, empty or unknown
/// decision is still pending, never approved. ALLOW → approved; BLOCK/HALT → rejected;
/// anything else → pending. A body that is not an object is pending (the SDK fails to
/// read it and retries).
pub fn interpret_approval(body: &Value, now_unix: f64, conventions: Conventions) -> ApprovalStatus {
    let Some(obj) = body.as_object() else {
        return ApprovalStatus::Pending;
    };
    if obj.get("expired").is_some_and(truthy) {
        return ApprovalStatus::Expired;
    }
    if let Some(text) = obj
        .get("approval_expiration_time")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        match super::clock::parse_utc(text) {
            Some(expires) if now_unix > expires => return ApprovalStatus::Expired,
            Some(_) => {}
            None => tracing::warn!(
                approval_expiration_time = text,
                "unparseable approval expiration time ignored"
            ),
        }
    }
    let verdict = match conventions {
        Conventions::V1 => {
            verdict_text(obj, "verdict", "action").map_or(Verdict::Allow, Verdict::parse)
        }
        Conventions::V2 => {
            match verdict_text(obj, "action", "verdict").and_then(Verdict::parse_known) {
                Some(v) => v,
                None => return ApprovalStatus::Pending,
            }
        }
    };
    match verdict {
        Verdict::Allow => ApprovalStatus::Approved,
        Verdict::Block | Verdict::Halt => ApprovalStatus::Rejected {
            reason: obj
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("Activity rejected")
                .to_owned(),
        },
        Verdict::RequireApproval | Verdict::Constrain => ApprovalStatus::Pending,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn resp(v: Value) -> EvaluateResponse {
        EvaluateResponse::from_value(&v).expect("object")
    }

    #[test]
    fn verdict_strings_of_both_api_versions_parse_and_unknown_is_allow() {
        let table = [
            ("allow", Verdict::Allow),
            ("ALLOW", Verdict::Allow),
            ("continue", Verdict::Allow),
            ("constrain", Verdict::Constrain),
            ("require_approval", Verdict::RequireApproval),
            ("require-approval", Verdict::RequireApproval),
            ("Request-Approval", Verdict::RequireApproval),
            ("block", Verdict::Block),
            ("halt", Verdict::Halt),
            ("stop", Verdict::Halt),
            ("STOP", Verdict::Halt),
            ("", Verdict::Allow),
            ("deny", Verdict::Allow),
            ("maybe", Verdict::Allow),
        ];
        for (text, want) in table {
            assert_eq!(Verdict::parse(text), want, "{text:?}");
        }
        assert_eq!(Verdict::parse_known("deny"), None);
    }

    #[test]
    fn priority_orders_halt_over_block_over_approval_over_constrain_over_allow() {
        assert_eq!(Verdict::Halt.priority(), 5);
        assert_eq!(Verdict::Allow.priority(), 1);
        assert_eq!(
            Verdict::highest([Verdict::Constrain, Verdict::Block, Verdict::RequireApproval]),
            Verdict::Block
        );
        assert_eq!(
            Verdict::highest([Verdict::Block, Verdict::Halt]),
            Verdict::Halt
        );
        assert_eq!(Verdict::highest([]), Verdict::Allow);
    }

    #[test]
    fn action_is_read_only_when_verdict_is_missing_or_empty() {
        assert_eq!(resp(json!({"action": "stop"})).verdict, Verdict::Halt);
        assert_eq!(
            resp(json!({"verdict": "", "action": "stop"})).verdict,
            Verdict::Halt
        );
        assert_eq!(
            resp(json!({"verdict": null, "action": "require-approval"})).verdict,
            Verdict::RequireApproval
        );
        assert_eq!(
            resp(json!({"verdict": "allow", "action": "stop"})).verdict,
            Verdict::Allow
        );
        assert_eq!(
            resp(json!({"verdict": "nonsense", "action": "stop"})).verdict,
            Verdict::Allow
        );
        assert_eq!(resp(json!({})).verdict, Verdict::Allow);
        // A verdict of the wrong type counts as missing.
        assert_eq!(
            resp(json!({"verdict": 5, "action": "block"})).verdict,
            Verdict::Block
        );
    }

    #[test]
    fn response_with_wrong_types_parses_to_defaults_without_panicking() {
        let r = resp(json!({
            "verdict": "block", "reason": 7, "risk_score": "0.5", "alignment_score": [],
            "behavioral_violations": [1, "x"], "constraints": {}, "metadata": "m",
            "guardrails_result": "yes", "policy_id": null
        }));
        assert_eq!(r.verdict, Verdict::Block);
        assert_eq!(r.reason, None);
        assert_eq!(r.risk_score, 0.5);
        assert_eq!(r.alignment_score, None);
        assert_eq!(r.behavioral_violations, Some(vec!["x".to_owned()]));
        assert_eq!(r.constraints, None);
        assert_eq!(r.metadata, None);
        assert_eq!(r.guardrails, None);
        assert!(EvaluateResponse::from_value(&json!([1, 2])).is_none());
        assert!(EvaluateResponse::from_value(&json!("allow")).is_none());
    }

    #[test]
    fn guardrails_are_read_from_either_key_and_reasons_join_with_semicolons() {
        let r = resp(
            json!({"guardrails": {"input_type": "activity_input", "validation_passed": false,
            "reasons": [{"type": "pii", "field": "prompt", "reason": "SSN found"}, {"reason": ""},
                        {"type": "x"}, "junk", {"reason": "email found"}]}}),
        );
        let g = r.guardrails.unwrap();
        assert!(!g.validation_passed);
        assert_eq!(g.failure_message("d"), "SSN found; email found");
        let r = resp(json!({"guardrails_result": {}, "guardrails": {"validation_passed": true}}));
        assert!(r.guardrails.unwrap().validation_passed);
        let g = GuardrailsResult::from_value(&json!({"reasons": []})).unwrap();
        assert_eq!(
            g.failure_message("Guardrails validation failed"),
            "Guardrails validation failed"
        );
    }

    #[test]
    fn block_and_halt_fail_non_retryably_with_distinct_types() {
        let d = decide(
            Stage::Started { arg_count: 1 },
            Some(&resp(json!({"verdict": "block", "reason": "no"}))),
            true,
        );
        assert_eq!(
            d,
            Decision::Fail {
                error_type: ErrorType::GovernanceBlock,
                message: "Governance blocked: no".into(),
                non_retryable: true,
                reason: Some("no".into()),
                patch: None,
            }
        );
        let d = decide(
            Stage::Completed,
            Some(&resp(json!({"action": "stop"}))),
            true,
        );
        assert_eq!(
            d.error(),
            Some((
                ErrorType::GovernanceHalt,
                "Governance blocked: No reason provided",
                true
            ))
        );
    }

    #[test]
    fn block_wins_over_guardrails_failure_and_guardrails_over_approval() {
        let gr = json!({"input_type": "activity_input", "validation_passed": false, "reasons": [{"reason": "pii"}]});
        let d = decide(
            Stage::Started { arg_count: 1 },
            Some(&resp(json!({"verdict": "block", "guardrails_result": gr}))),
            true,
        );
        assert_eq!(d.error().unwrap().0, ErrorType::GovernanceBlock);
        let d = decide(
            Stage::Started { arg_count: 1 },
            Some(&resp(
                json!({"verdict": "require_approval", "guardrails_result": gr}),
            )),
            true,
        );
        assert_eq!(
            d.error(),
            Some((
                ErrorType::GuardrailsValidationFailed,
                "Guardrails validation failed: pii",
                true
            ))
        );
        // Validation is checked even when input_type names the other stage (SDK 1.0).
        let d = decide(
            Stage::Completed,
            Some(&resp(json!({"guardrails_result": gr}))),
            true,
        );
        assert_eq!(d.error().unwrap().0, ErrorType::GuardrailsValidationFailed);
        let d = decide(
            Stage::Completed,
            Some(&resp(
                json!({"guardrails_result": {"input_type": "activity_output", "validation_passed": false}}),
            )),
            true,
        );
        assert_eq!(
            d.error().unwrap().1,
            "Guardrails validation failed: Guardrails output validation failed"
        );
    }

    #[test]
    fn require_approval_is_pending_only_with_hitl() {
        let r = resp(json!({"verdict": "require_approval", "reason": "big spend"}));
        let d = decide(Stage::Started { arg_count: 0 }, Some(&r), true);
        assert_eq!(
            d,
            Decision::ApprovalPending {
                message: "Approval required: big spend".into()
            }
        );
        assert_eq!(
            d.error(),
            Some((
                ErrorType::ApprovalPending,
                "Approval required: big spend",
                false
            ))
        );
        let d = decide(
            Stage::Completed,
            Some(&resp(json!({"verdict": "require-approval"}))),
            true,
        );
        assert_eq!(
            d,
            Decision::ApprovalPending {
                message: "Approval required for output: Activity output requires human approval"
                    .into()
            }
        );
        let d = decide(Stage::Started { arg_count: 0 }, Some(&r), false);
        assert_eq!(
            d,
            Decision::Continue {
                verdict: Some(Verdict::RequireApproval),
                constrained: false,
                redaction: None
            }
        );
    }

    #[test]
    fn constrain_and_no_verdict_continue() {
        let d = decide(
            Stage::Completed,
            Some(&resp(json!({"verdict": "constrain"}))),
            true,
        );
        assert_eq!(
            d,
            Decision::Continue {
                verdict: Some(Verdict::Constrain),
                constrained: true,
                redaction: None
            }
        );
        assert_eq!(
            decide(Stage::Completed, None, true),
            Decision::allow_without_verdict()
        );
    }

    fn input_redaction_of(redacted: Value, arg_count: usize) -> Option<Redaction> {
        let r = resp(json!({"verdict": "allow",
            "guardrails_result": {"input_type": "activity_input", "redacted_input": redacted}}));
        match decide(Stage::Started { arg_count }, Some(&r), true) {
            Decision::Continue { redaction, .. } => redaction,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn input_redaction_wraps_an_object_and_keeps_only_object_entries_below_the_arg_count() {
        let one = input_redaction_of(json!({"prompt": "[REDACTED]"}), 2).unwrap();
        assert_eq!(
            one,
            Redaction::Input {
                args: vec![ArgRedaction {
                    index: 0,
                    value: json!({"prompt": "[REDACTED]"}).as_object().unwrap().clone()
                }]
            }
        );
        let list = input_redaction_of(json!(["plain", {"b": 1}, {"c": 2}]), 2).unwrap();
        let Redaction::Input { args } = list else {
            panic!()
        };
        assert_eq!(args.len(), 1);
        assert_eq!(args[0].index, 1);
        assert_eq!(input_redaction_of(json!("text"), 1), None);
        assert_eq!(input_redaction_of(json!(null), 1), None);
        assert_eq!(input_redaction_of(json!([1, 2]), 2), None);
        assert_eq!(input_redaction_of(json!({"a": 1}), 0), None);
    }

    #[test]
    fn redaction_for_the_other_stage_is_ignored() {
        let r = resp(
            json!({"guardrails_result": {"input_type": "activity_output", "redacted_input": {"a": 1}}}),
        );
        assert_eq!(
            decide(Stage::Started { arg_count: 1 }, Some(&r), true),
            Decision::Continue {
                verdict: Some(Verdict::Allow),
                constrained: false,
                redaction: None
            }
        );
        let r = resp(
            json!({"guardrails_result": {"input_type": "activity_input", "redacted_input": {"a": 1}}}),
        );
        assert_eq!(
            decide(Stage::Completed, Some(&r), true),
            Decision::Continue {
                verdict: Some(Verdict::Allow),
                constrained: false,
                redaction: None
            }
        );
    }

    #[test]
    fn output_redaction_replaces_or_merges_and_null_leaves_the_result() {
        let out = |redacted: Value| {
            let r = resp(
                json!({"guardrails_result": {"input_type": "activity_output", "redacted_input": redacted}}),
            );
            match decide(Stage::Completed, Some(&r), true) {
                Decision::Continue { redaction, .. } => redaction,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(out(json!(null)), None);
        let red = out(json!("[REDACTED]")).unwrap();
        let mut result = json!({"text": "secret"});
        red.apply_to_output_json(&mut result);
        assert_eq!(result, json!("[REDACTED]"));
        let red = out(json!({"text": "[REDACTED]", "extra": 1})).unwrap();
        let mut result = json!({"text": "secret", "tokens": 5});
        red.apply_to_output_json(&mut result);
        assert_eq!(result, json!({"text": "[REDACTED]", "tokens": 5}));
    }

    #[test]
    fn input_redaction_merges_dataclass_like_objects_and_replaces_plain_args() {
        let red = input_redaction_of(
            json!([{"prompt": "[R]", "user": {"email": "[R]"}, "items": [{"n": "[R]"}], "unknown": 1}, {"x": 1}]),
            3,
        )
        .unwrap();
        let mut args = vec![
            json!({"prompt": "ssn 123", "user": {"email": "a@b", "id": 7}, "items": [{"n": "a", "k": 1}, {"n": "b"}], "temp": 0.2}),
            json!("plain string"),
            json!(3),
        ];
        red.apply_to_input_json(&mut args);
        assert_eq!(
            args[0],
            json!({"prompt": "[R]", "user": {"email": "[R]", "id": 7}, "items": [{"n": "[R]", "k": 1}, {"n": "b"}], "temp": 0.2})
        );
        assert_eq!(args[1], json!({"x": 1}));
        assert_eq!(args[2], json!(3));
    }

    #[test]
    fn decision_serializes_for_the_hook() {
        let d = Decision::fail(ErrorType::GovernanceHalt, "Governance blocked: x");
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            json!({"action": "fail", "error_type": "GovernanceHalt", "message": "Governance blocked: x", "non_retryable": true})
        );
        let red = input_redaction_of(json!({"p": 1}), 1);
        let d = Decision::Continue {
            verdict: Some(Verdict::Allow),
            constrained: false,
            redaction: red,
        };
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            json!({"action": "continue", "verdict": "allow", "constrained": false,
                   "redaction": {"target": "input", "args": [{"index": 0, "value": {"p": 1}}]}})
        );
        assert_eq!(
            serde_json::to_value(Decision::ApprovalPending {
                message: "m".into()
            })
            .unwrap(),
            json!({"action": "approval_pending", "message": "m"})
        );
    }

    #[test]
    fn approval_poll_answers_are_interpreted_sdk_1_0_style() {
        let now = 1_768_153_419.0; // 2026-01-11T17:43:39Z
        let table = [
            (json!({}), ApprovalStatus::Approved),
            (json!({"verdict": "allow"}), ApprovalStatus::Approved),
            (json!({"action": "continue"}), ApprovalStatus::Approved),
            (
                json!({"verdict": "require_approval"}),
                ApprovalStatus::Pending,
            ),
            (json!({"verdict": "constrain"}), ApprovalStatus::Pending),
            (
                json!({"verdict": "block", "reason": "nope"}),
                ApprovalStatus::Rejected {
                    reason: "nope".into(),
                },
            ),
            (
                json!({"action": "stop"}),
                ApprovalStatus::Rejected {
                    reason: "Activity rejected".into(),
                },
            ),
            // verdict before action (SDK 1.0 order).
            (
                json!({"verdict": "allow", "action": "block"}),
                ApprovalStatus::Approved,
            ),
            (
                json!({"verdict": "allow", "expired": true}),
                ApprovalStatus::Expired,
            ),
            (
                json!({"verdict": "allow", "expired": false}),
                ApprovalStatus::Approved,
            ),
            (
                json!({"verdict": "allow", "approval_expiration_time": "2026-01-11T17:43:38Z"}),
                ApprovalStatus::Expired,
            ),
            (
                json!({"verdict": "allow", "approval_expiration_time": "2026-01-11T17:43:38+00:00"}),
                ApprovalStatus::Expired,
            ),
            (
                json!({"verdict": "allow", "approval_expiration_time": "2026-01-11 17:43:38"}),
                ApprovalStatus::Expired,
            ),
            (
                json!({"verdict": "allow", "approval_expiration_time": "2026-01-11 17:43:40"}),
                ApprovalStatus::Approved,
            ),
            (
                json!({"verdict": "block", "approval_expiration_time": "2026-01-11T18:43:38+02:00"}),
                ApprovalStatus::Expired,
            ),
            (
                json!({"verdict": "allow", "approval_expiration_time": "soon"}),
                ApprovalStatus::Approved,
            ),
            (
                json!({"verdict": "allow", "approval_expiration_time": ""}),
                ApprovalStatus::Approved,
            ),
            (json!([]), ApprovalStatus::Pending),
        ];
        for (body, want) in table {
            assert_eq!(
                interpret_approval(&body, now, Conventions::V1),
                want,
                "{body}"
            );
        }
    }

    #[test]
    fn sdk2_approval_answers_read_action_first_and_never_approve_without_a_decision() {
        let now = 1_768_153_419.0;
        let table = [
            (json!({}), ApprovalStatus::Approved, ApprovalStatus::Pending),
            (
                json!({"verdict": ""}),
                ApprovalStatus::Approved,
                ApprovalStatus::Pending,
            ),
            (
                json!({"verdict": "maybe"}),
                ApprovalStatus::Approved,
                ApprovalStatus::Pending,
            ),
            (
                json!({"verdict": "allow", "action": "require-approval"}),
                ApprovalStatus::Approved,
                ApprovalStatus::Pending,
            ),
            (
                json!({"verdict": "require_approval", "action": "continue"}),
                ApprovalStatus::Pending,
                ApprovalStatus::Approved,
            ),
            (
                json!({"verdict": "allow"}),
                ApprovalStatus::Approved,
                ApprovalStatus::Approved,
            ),
            (
                json!({"expired": true}),
                ApprovalStatus::Expired,
                ApprovalStatus::Expired,
            ),
        ];
        for (body, v1, v2) in table {
            assert_eq!(
                interpret_approval(&body, now, Conventions::V1),
                v1,
                "1.0 {body}"
            );
            assert_eq!(
                interpret_approval(&body, now, Conventions::V2),
                v2,
                "2.0 {body}"
            );
        }
    }

    #[test]
    fn a_block_with_a_valid_patch_carries_the_governance_patch_details() {
        let d = decide(
            Stage::Started { arg_count: 1 },
            Some(&resp(json!({"verdict": "block", "reason": "fix it",
                "governance_event_id": "ge-1", "patch": {"new_input": {"amount": 5}}}))),
            true,
        );
        let Decision::Fail {
            error_type,
            reason,
            patch: Some(patch),
            ..
        } = &d
        else {
            panic!("no patch in {d:?}")
        };
        assert_eq!(*error_type, ErrorType::GovernanceBlock);
        assert_eq!(reason.as_deref(), Some("fix it"));
        assert_eq!(
            serde_json::to_value(patch).unwrap(),
            json!({"schema_version": 1, "new_input": {"amount": 5}, "governance_event_id": "ge-1",
                   "reason": "fix it", "event_type": "ActivityStarted", "hook_trigger": false,
                   "hook_stage": null})
        );
        // A null new_input is a valid patch (keep the original input).
        let d = decide(
            Stage::Completed,
            Some(&resp(
                json!({"verdict": "block", "patch": {"new_input": null}}),
            )),
            true,
        );
        assert!(
            matches!(&d, Decision::Fail { patch: Some(p), .. }
                if p.new_input.is_null() && p.event_type == "ActivityCompleted" && p.reason.is_none()),
            "{d:?}"
        );
    }

    #[test]
    fn a_patch_breaking_the_rules_or_on_halt_is_ignored() {
        let max = 9_007_199_254_740_991_i64;
        let invalid = [
            json!({"new_input": true}),
            json!({"new_input": 1, "extra": 2}),
            json!({}),
            json!("text"),
            json!({"new_input": max + 1}),
            json!({"new_input": [-(max + 1)]}),
            json!({"new_input": {"deep": [1e300]}}),
            json!({"new_input": 18_446_744_073_709_551_615_u64}),
        ];
        for patch in invalid {
            let r = resp(json!({"verdict": "block", "patch": patch}));
            assert_eq!(r.patch, None, "{patch} accepted");
            let d = decide(Stage::Completed, Some(&r), true);
            assert!(matches!(d, Decision::Fail { patch: None, .. }), "{d:?}");
        }
        let valid = [
            json!(max),
            json!(-max),
            json!(1.5),
            json!("s"),
            json!([1, {"a": [true, null]}]),
        ];
        for new_input in valid {
            let r = resp(json!({"verdict": "block", "patch": {"new_input": new_input}}));
            assert_eq!(r.patch.as_ref(), Some(&new_input));
        }
        for verdict in ["halt", "stop", "allow", "require_approval"] {
            let r = resp(json!({"verdict": verdict, "patch": {"new_input": 1}}));
            let d = decide(Stage::Started { arg_count: 1 }, Some(&r), false);
            assert!(
                !matches!(d, Decision::Fail { patch: Some(_), .. }),
                "{verdict}: {d:?}"
            );
        }
        // The hook reads no patch or reason when there is none: the fields are left out.
        let d = stop_decision(Verdict::Block, "r");
        let wire = serde_json::to_value(&d).unwrap();
        assert_eq!(wire.get("patch"), None);
        assert_eq!(wire["reason"], "r");
    }
}
