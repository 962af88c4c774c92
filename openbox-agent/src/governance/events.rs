//! The six governance events with SDK 1.0 payloads (protocol §2.2), and their wire bytes.
//!
//! Builders return `serde_json::Value`s; [`encode`] writes them as compact JSON with the
//! top-level keys in the SDK's order (the order its Python dicts are built in, as in the
//! §2.2 example) whatever order the map holds them in, so the bytes are the same with or
//! without serde_json's `preserve_order`. Nested values (inputs, spans) are written as
//! they are.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::clock;

pub const WORKFLOW_STARTED: &str = "WorkflowStarted";
pub const WORKFLOW_COMPLETED: &str = "WorkflowCompleted";
pub const WORKFLOW_FAILED: &str = "WorkflowFailed";
pub const SIGNAL_RECEIVED: &str = "SignalReceived";
pub const ACTIVITY_STARTED: &str = "ActivityStarted";
pub const ACTIVITY_COMPLETED: &str = "ActivityCompleted";
pub const SOURCE: &str = "workflow-telemetry";

/// The workflow an event is about (what the hook's workflow interceptor knows).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkflowInfo {
    pub workflow_id: String,
    pub run_id: String,
    pub workflow_type: String,
    /// Sent on WorkflowStarted and SignalReceived only.
    #[serde(default)]
    pub task_queue: String,
}

/// The activity an event is about: the fields of the hook's `activity_start` message.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ActivityInfo {
    pub workflow_id: String,
    pub run_id: String,
    pub workflow_type: String,
    pub activity_id: String,
    pub activity_type: String,
    pub task_queue: String,
    /// Temporal's attempt number, from 1.
    pub attempt: u32,
}

/// `"completed"` or `"failed"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivityStatus {
    Completed,
    Failed,
}

/// The activity-level `error` field: `{"type": <exception class>, "message": <text>}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActivityError {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
}

/// What ActivityCompleted adds to the activity fields.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivityCompletion {
    pub status: ActivityStatus,
    /// When the activity started and ended (the SDK's `time.time()` around execution).
    pub start_time: SystemTime,
    pub end_time: SystemTime,
    /// The positional arguments **after input redaction**.
    pub activity_input: Vec<Value>,
    /// The serialized result; forced to null when the activity failed.
    pub activity_output: Value,
    pub error: Option<ActivityError>,
    /// §3.1 spans that ended before the activity did.
    pub spans: Vec<Value>,
}

pub fn workflow_started(wf: &WorkflowInfo, now: SystemTime) -> Value {
    json!({
        "source": SOURCE, "event_type": WORKFLOW_STARTED, "workflow_id": wf.workflow_id, "run_id": wf.run_id,
        "workflow_type": wf.workflow_type, "task_queue": wf.task_queue, "timestamp": clock::rfc3339_millis(now),
    })
}

/// `workflow_output` is the serialized result (may be null). No `task_queue` (§2.2).
pub fn workflow_completed(wf: &WorkflowInfo, workflow_output: Value, now: SystemTime) -> Value {
    json!({
        "source": SOURCE, "event_type": WORKFLOW_COMPLETED, "workflow_id": wf.workflow_id, "run_id": wf.run_id,
        "workflow_type": wf.workflow_type, "workflow_output": workflow_output, "timestamp": clock::rfc3339_millis(now),
    })
}

/// `error` as built by [`workflow_error`]. No `task_queue` (§2.2).
pub fn workflow_failed(wf: &WorkflowInfo, error: Value, now: SystemTime) -> Value {
    json!({
        "source": SOURCE, "event_type": WORKFLOW_FAILED, "workflow_id": wf.workflow_id, "run_id": wf.run_id,
        "workflow_type": wf.workflow_type, "error": error, "timestamp": clock::rfc3339_millis(now),
    })
}

pub fn signal_received(
    wf: &WorkflowInfo,
    signal_name: &str,
    signal_args: Vec<Value>,
    now: SystemTime,
) -> Value {
    json!({
        "source": SOURCE, "event_type": SIGNAL_RECEIVED, "workflow_id": wf.workflow_id, "run_id": wf.run_id,
        "workflow_type": wf.workflow_type, "task_queue": wf.task_queue, "signal_name": signal_name,
        "signal_args": signal_args, "timestamp": clock::rfc3339_millis(now),
    })
}

fn activity_base(a: &ActivityInfo, event_type: &str, now: SystemTime) -> Map<String, Value> {
    let Value::Object(map) = json!({
        "source": SOURCE, "event_type": event_type, "workflow_id": a.workflow_id, "run_id": a.run_id,
        "workflow_type": a.workflow_type, "activity_id": a.activity_id, "activity_type": a.activity_type,
        "task_queue": a.task_queue, "attempt": a.attempt, "timestamp": clock::rfc3339_millis(now),
    }) else {
        unreachable!("json! object")
    };
    map
}

/// `activity_input` is always the array of positional arguments (`[]` for none).
pub fn activity_started(a: &ActivityInfo, activity_input: Vec<Value>, now: SystemTime) -> Value {
    let mut m = activity_base(a, ACTIVITY_STARTED, now);
    m.insert("activity_input".into(), Value::Array(activity_input));
    Value::Object(m)
}

pub fn activity_completed(a: &ActivityInfo, c: ActivityCompletion, now: SystemTime) -> Value {
    let mut m = activity_base(a, ACTIVITY_COMPLETED, now);
    m.insert("status".into(), json!(c.status));
    m.insert(
        "start_time".into(),
        json!(clock::unix_seconds(c.start_time)),
    );
    m.insert("end_time".into(), json!(clock::unix_seconds(c.end_time)));
    // From the two instants, not from the two rounded floats (which would give 1200.0000476…).
    let duration_ms = match c.end_time.duration_since(c.start_time) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    };
    m.insert("duration_ms".into(), json!(duration_ms));
    m.insert("span_count".into(), json!(c.spans.len()));
    m.insert("spans".into(), Value::Array(c.spans));
    m.insert("activity_input".into(), Value::Array(c.activity_input));
    let output = if c.status == ActivityStatus::Failed {
        Value::Null
    } else {
        c.activity_output
    };
    m.insert("activity_output".into(), output);
    m.insert("error".into(), c.error.map_or(Value::Null, |e| json!(e)));
    Value::Object(m)
}

/// One link of a WorkflowFailed error chain (§2.3).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ErrorLink {
    /// The exception class name (`ActivityError`, `ApplicationError`, …).
    pub kind: String,
    pub message: String,
    /// The `ApplicationError.type` string, when the exception has one.
    pub error_type: Option<String>,
    /// Only when the exception has that attribute (`cause` only in SDK 1.0).
    pub non_retryable: Option<bool>,
}

/// The WorkflowFailed `error` object (§2.3): `{type, message, cause?, root_cause?}`;
/// `cause` carries `error_type`/`non_retryable` when known, `root_cause` `error_type`
/// (SDK 1.0 does not put `non_retryable` on the root cause).
pub fn workflow_error(
    kind: &str,
    message: &str,
    cause: Option<&ErrorLink>,
    root_cause: Option<&ErrorLink>,
) -> Value {
    let mut m = Map::new();
    m.insert("type".into(), json!(kind));
    m.insert("message".into(), json!(message));
    if let Some(c) = cause {
        let mut cm = Map::new();
        cm.insert("type".into(), json!(c.kind));
        cm.insert("message".into(), json!(c.message));
        if let Some(t) = c.error_type.as_ref().filter(|t| !t.is_empty()) {
            cm.insert("error_type".into(), json!(t));
        }
        if let Some(nr) = c.non_retryable {
            cm.insert("non_retryable".into(), json!(nr));
        }
        m.insert("cause".into(), Value::Object(cm));
        if let Some(r) = root_cause {
            let mut rm = Map::new();
            rm.insert("type".into(), json!(r.kind));
            rm.insert("message".into(), json!(r.message));
            if let Some(t) = r.error_type.as_ref().filter(|t| !t.is_empty()) {
                rm.insert("error_type".into(), json!(t));
            }
            m.insert("root_cause".into(), Value::Object(rm));
        }
    }
    Value::Object(m)
}

/// SDK 1.0 key order per event type. Workflow events get `timestamp` last (it is added in
/// the sending activity); activity events after `attempt`.
fn key_order(event_type: &str) -> &'static [&'static str] {
    const WF_HEAD: [&str; 5] = [
        "source",
        "event_type",
        "workflow_id",
        "run_id",
        "workflow_type",
    ];
    match event_type {
        WORKFLOW_STARTED => &[
            "source",
            "event_type",
            "workflow_id",
            "run_id",
            "workflow_type",
            "task_queue",
            "timestamp",
        ],
        WORKFLOW_COMPLETED => &[
            "source",
            "event_type",
            "workflow_id",
            "run_id",
            "workflow_type",
            "workflow_output",
            "timestamp",
        ],
        WORKFLOW_FAILED => &[
            "source",
            "event_type",
            "workflow_id",
            "run_id",
            "workflow_type",
            "error",
            "timestamp",
        ],
        SIGNAL_RECEIVED => &[
            "source",
            "event_type",
            "workflow_id",
            "run_id",
            "workflow_type",
            "task_queue",
            "signal_name",
            "signal_args",
            "timestamp",
        ],
        ACTIVITY_STARTED | ACTIVITY_COMPLETED => &[
            "source",
            "event_type",
            "workflow_id",
            "run_id",
            "workflow_type",
            "activity_id",
            "activity_type",
            "task_queue",
            "attempt",
            "timestamp",
            "status",
            "start_time",
            "end_time",
            "duration_ms",
            "span_count",
            "spans",
            "activity_input",
            "activity_output",
            "error",
        ],
        _ => &WF_HEAD,
    }
}

/// The event as compact JSON bytes (the request body, a spool line, a sink line): known
/// top-level keys in SDK order, then any others in map order. Non-object values are
/// written as they are.
pub fn encode(event: &Value) -> Vec<u8> {
    let Value::Object(map) = event else {
        return serde_json::to_vec(event).unwrap_or_default();
    };
    let order = key_order(map.get("event_type").and_then(Value::as_str).unwrap_or(""));
    let mut out = Vec::with_capacity(256);
    out.push(b'{');
    let mut first = true;
    let mut put = |out: &mut Vec<u8>, k: &str, v: &Value| {
        if !first {
            out.push(b',');
        }
        first = false;
        // Strings and Values always serialize; a failure here would be a serde_json bug.
        let _ = serde_json::to_writer(&mut *out, k);
        out.push(b':');
        let _ = serde_json::to_writer(&mut *out, v);
    };
    for k in order {
        if let Some(v) = map.get(*k) {
            put(&mut out, k, v);
        }
    }
    for (k, v) in map {
        if !order.contains(&k.as_str()) {
            put(&mut out, k, v);
        }
    }
    out.push(b'}');
    out
}

/// A top-level string field of an event, `""` when missing or not a string.
pub fn str_field<'a>(event: &'a Value, key: &str) -> &'a str {
    event.get(key).and_then(Value::as_str).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn info() -> ActivityInfo {
        ActivityInfo {
            workflow_id: "wf-1".into(),
            run_id: "r-1".into(),
            workflow_type: "MyWorkflow".into(),
            activity_id: "1".into(),
            activity_type: "call_llm".into(),
            task_queue: "q".into(),
            attempt: 1,
        }
    }

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn activity_completed_matches_the_sdk_example_byte_for_byte() {
        let c = ActivityCompletion {
            status: ActivityStatus::Completed,
            start_time: at(1_736_937_045_100),
            end_time: at(1_736_937_046_300),
            activity_input: vec![json!({"prompt": "hi"})],
            activity_output: json!({"text": "hello"}),
            error: None,
            spans: vec![json!({"name": "POST"})],
        };
        let ev = activity_completed(&info(), c, at(1_768_473_045_123));
        let text = String::from_utf8(encode(&ev)).unwrap();
        assert_eq!(
            text,
            r#"{"source":"workflow-telemetry","event_type":"ActivityCompleted","workflow_id":"wf-1","run_id":"r-1","workflow_type":"MyWorkflow","activity_id":"1","activity_type":"call_llm","task_queue":"q","attempt":1,"timestamp":"2026-01-15T10:30:45.123Z","status":"completed","start_time":1736937045.1,"end_time":1736937046.3,"duration_ms":1200.0,"span_count":1,"spans":[{"name":"POST"}],"activity_input":[{"prompt":"hi"}],"activity_output":{"text":"hello"},"error":null}"#
        );
    }

    #[test]
    fn failed_activity_has_null_output_and_an_error_object() {
        let c = ActivityCompletion {
            status: ActivityStatus::Failed,
            start_time: at(1000),
            end_time: at(1500),
            activity_input: vec![],
            activity_output: json!("ignored"),
            error: Some(ActivityError {
                kind: "ValueError".into(),
                message: "bad".into(),
            }),
            spans: vec![],
        };
        let ev = activity_completed(&info(), c, at(2000));
        assert_eq!(ev["status"], "failed");
        assert_eq!(ev["activity_output"], Value::Null);
        assert_eq!(ev["error"], json!({"type": "ValueError", "message": "bad"}));
        assert_eq!(ev["duration_ms"], json!(500.0));
        assert_eq!(ev["span_count"], 0);
        assert_eq!(ev["activity_input"], json!([]));
    }

    #[test]
    fn activity_started_and_workflow_events_have_sdk_fields_and_order() {
        let ev = activity_started(&info(), vec![json!("a"), json!(2)], at(0));
        assert_eq!(
            String::from_utf8(encode(&ev)).unwrap(),
            r#"{"source":"workflow-telemetry","event_type":"ActivityStarted","workflow_id":"wf-1","run_id":"r-1","workflow_type":"MyWorkflow","activity_id":"1","activity_type":"call_llm","task_queue":"q","attempt":1,"timestamp":"1970-01-01T00:00:00.000Z","activity_input":["a",2]}"#
        );
        let wf = WorkflowInfo {
            workflow_id: "w".into(),
            run_id: "r".into(),
            workflow_type: "T".into(),
            task_queue: "q".into(),
        };
        assert_eq!(
            String::from_utf8(encode(&workflow_started(&wf, at(0)))).unwrap(),
            r#"{"source":"workflow-telemetry","event_type":"WorkflowStarted","workflow_id":"w","run_id":"r","workflow_type":"T","task_queue":"q","timestamp":"1970-01-01T00:00:00.000Z"}"#
        );
        let done = workflow_completed(&wf, Value::Null, at(0));
        assert!(done.get("task_queue").is_none());
        assert_eq!(done["workflow_output"], Value::Null);
        let sig = signal_received(&wf, "approve", vec![json!(true)], at(0));
        assert_eq!(
            String::from_utf8(encode(&sig)).unwrap(),
            r#"{"source":"workflow-telemetry","event_type":"SignalReceived","workflow_id":"w","run_id":"r","workflow_type":"T","task_queue":"q","signal_name":"approve","signal_args":[true],"timestamp":"1970-01-01T00:00:00.000Z"}"#
        );
        let failed = workflow_failed(
            &wf,
            workflow_error("ActivityError", "Activity task failed", None, None),
            at(0),
        );
        assert!(failed.get("task_queue").is_none());
        assert_eq!(
            failed["error"],
            json!({"type": "ActivityError", "message": "Activity task failed"})
        );
    }

    #[test]
    fn workflow_error_object_follows_section_2_3() {
        let cause = ErrorLink {
            kind: "ApplicationError".into(),
            message: "Governance blocked: x".into(),
            error_type: Some("GovernanceBlock".into()),
            non_retryable: Some(true),
        };
        let root = ErrorLink {
            kind: "ValueError".into(),
            message: "m".into(),
            error_type: None,
            non_retryable: Some(false),
        };
        let e = workflow_error(
            "ActivityError",
            "Activity task failed",
            Some(&cause),
            Some(&root),
        );
        assert_eq!(
            e,
            json!({"type": "ActivityError", "message": "Activity task failed",
                   "cause": {"type": "ApplicationError", "message": "Governance blocked: x",
                             "error_type": "GovernanceBlock", "non_retryable": true},
                   "root_cause": {"type": "ValueError", "message": "m"}})
        );
        // No cause: no root cause either.
        let e = workflow_error("TimeoutError", "t", None, Some(&root));
        assert_eq!(e, json!({"type": "TimeoutError", "message": "t"}));
    }

    #[test]
    fn encode_keeps_unknown_keys_after_known_ones_and_handles_non_objects() {
        let ev = json!({"zzz": 1, "event_type": "ActivityStarted", "source": "workflow-telemetry"});
        assert_eq!(
            encode(&ev),
            br#"{"source":"workflow-telemetry","event_type":"ActivityStarted","zzz":1}"#
        );
        assert_eq!(encode(&json!([1])), b"[1]");
    }

    #[test]
    fn activity_info_deserializes_from_the_hook_message() {
        let msg = json!({"workflow_id": "w", "run_id": "r", "workflow_type": "T", "activity_id": "3",
            "activity_type": "a", "task_queue": "q", "attempt": 2, "start_time": 1.5, "input": []});
        let a: ActivityInfo = serde_json::from_value(msg).unwrap();
        assert_eq!(a.attempt, 2);
        assert_eq!(a.activity_id, "3");
    }
}
