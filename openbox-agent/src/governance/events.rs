//! The six governance events with SDK 1.0 payloads (protocol §2.2), SDK 2.0's Handoff and
//! `multi_agent_session_id` (§2.4), and their wire bytes.
//!
//! Each event is a struct whose fields serialize in the SDK's key order (the order its
//! Python dicts are built in, as in the §2.2 example); the governor reads them typed and
//! [`encode`]s each once, for Core, the events sink and the spool alike.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{clock, hook_events::HookSpan};
use crate::span::Span;

pub const WORKFLOW_STARTED: &str = "WorkflowStarted";
pub const WORKFLOW_COMPLETED: &str = "WorkflowCompleted";
pub const WORKFLOW_FAILED: &str = "WorkflowFailed";
pub const SIGNAL_RECEIVED: &str = "SignalReceived";
pub const ACTIVITY_STARTED: &str = "ActivityStarted";
pub const ACTIVITY_COMPLETED: &str = "ActivityCompleted";
pub const HANDOFF: &str = "Handoff";
pub const SOURCE: &str = "workflow-telemetry";

/// The workflow an event is about (what the hook's workflow interceptor knows).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkflowInfo {
    pub workflow_id: String,
    pub run_id: String,
    #[serde(default)]
    pub workflow_type: String,
    /// Sent on WorkflowStarted and SignalReceived only.
    #[serde(default)]
    pub task_queue: String,
    /// The application's multi-agent session (SDK 2.0, §2.4: the workflow memo's
    /// `openbox_multi_agent_session_id`, which the hook carries to activities in a
    /// header). Sent on every event of the run when set, never as null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_agent_session_id: Option<String>,
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
    /// The application's multi-agent session (SDK 2.0, §2.4: the workflow memo's
    /// `openbox_multi_agent_session_id`, which the hook carries to activities in a
    /// header). Sent on every event of the run when set, never as null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_agent_session_id: Option<String>,
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
    #[serde(default)]
    pub message: String,
}

/// What ActivityCompleted adds to the activity fields.
#[derive(Clone, Debug)]
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
    pub spans: Vec<Span>,
}

/// One governance event, typed until it is encoded.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Event {
    WorkflowStarted(WorkflowStarted),
    WorkflowCompleted(WorkflowCompleted),
    WorkflowFailed(WorkflowFailed),
    SignalReceived(SignalReceived),
    ActivityStarted(ActivityStarted),
    ActivityCompleted(ActivityCompleted),
    Handoff(Handoff),
    HookEvent(HookEvent),
}

/// The fields every event starts with.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Head {
    pub source: &'static str,
    pub event_type: &'static str,
    pub workflow_id: String,
    pub run_id: String,
    pub workflow_type: String,
}

impl Head {
    fn new(event_type: &'static str, workflow_id: &str, run_id: &str, workflow_type: &str) -> Head {
        Head {
            source: SOURCE,
            event_type,
            workflow_id: workflow_id.to_owned(),
            run_id: run_id.to_owned(),
            workflow_type: workflow_type.to_owned(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkflowStarted {
    #[serde(flatten)]
    pub head: Head,
    pub task_queue: String,
    pub timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multi_agent_session_id: Option<String>,
    /// The workflow's arguments as an array (SDK 2.0 sends them under this name, §2.2);
    /// SDK 1.0 conventions leave them out (see [`super::Conventions::shape`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activity_input: Option<Vec<Value>>,
}

/// No `task_queue` (§2.2).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkflowCompleted {
    #[serde(flatten)]
    pub head: Head,
    /// The serialized result (may be null).
    pub workflow_output: Value,
    pub timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multi_agent_session_id: Option<String>,
}

/// No `task_queue` (§2.2).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkflowFailed {
    #[serde(flatten)]
    pub head: Head,
    /// As built by [`workflow_error`].
    pub error: Value,
    pub timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multi_agent_session_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SignalReceived {
    #[serde(flatten)]
    pub head: Head,
    pub task_queue: String,
    pub signal_name: String,
    pub signal_args: Vec<Value>,
    pub timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multi_agent_session_id: Option<String>,
}

/// The activity fields after the head (activity events put `timestamp` after `attempt`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActivityHead {
    #[serde(flatten)]
    pub head: Head,
    pub activity_id: String,
    pub activity_type: String,
    pub task_queue: String,
    pub attempt: u32,
    pub timestamp: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multi_agent_session_id: Option<String>,
}

impl ActivityHead {
    fn new(a: &ActivityInfo, event_type: &'static str, now: SystemTime) -> ActivityHead {
        ActivityHead {
            head: Head::new(event_type, &a.workflow_id, &a.run_id, &a.workflow_type),
            activity_id: a.activity_id.clone(),
            activity_type: a.activity_type.clone(),
            task_queue: a.task_queue.clone(),
            attempt: a.attempt,
            timestamp: clock::rfc3339_millis(now),
            multi_agent_session_id: a.multi_agent_session_id.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActivityStarted {
    #[serde(flatten)]
    pub activity: ActivityHead,
    /// Always the array of positional arguments (`[]` for none).
    pub activity_input: Vec<Value>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ActivityCompleted {
    #[serde(flatten)]
    pub activity: ActivityHead,
    pub status: ActivityStatus,
    /// Unix seconds.
    pub start_time: f64,
    pub end_time: f64,
    pub duration_ms: f64,
    pub span_count: usize,
    pub spans: Vec<Span>,
    pub activity_input: Vec<Value>,
    /// Null when the activity failed.
    pub activity_output: Value,
    pub error: Option<ActivityError>,
}

/// An SDK 2.0 hook event (§3.2): ActivityStarted with `hook_trigger: true` and the one
/// operation's span at one stage.
#[derive(Clone, Debug, Serialize)]
pub struct HookEvent {
    #[serde(flatten)]
    pub activity: ActivityHead,
    pub hook_trigger: bool,
    pub activity_input: Vec<Value>,
    pub span_count: usize,
    pub spans: Vec<HookSpan>,
    /// The captured operation, for the embedded local policy's span conditions (not sent).
    #[serde(skip)]
    pub operation: Vec<Span>,
}

/// The hook event of one operation's stage.
pub fn hook_event(
    a: &ActivityInfo,
    activity_input: Vec<Value>,
    span: HookSpan,
    operation: Option<Span>,
    now: SystemTime,
) -> HookEvent {
    HookEvent {
        activity: ActivityHead::new(a, ACTIVITY_STARTED, now),
        hook_trigger: true,
        activity_input,
        span_count: 1,
        spans: vec![span],
        operation: operation.into_iter().collect(),
    }
}

/// A multi-agent handoff (SDK 2.0, §2.2/§2.4): only who hands off and in which session;
/// Core derives the receiver from the signed identity. The run it was emitted in is kept
/// (not sent) so the governor orders and routes it like the run's other events.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Handoff {
    #[serde(skip)]
    pub head: Head,
    pub source: &'static str,
    pub event_type: &'static str,
    pub from_agent_did: String,
    pub multi_agent_session_id: String,
    pub timestamp: String,
}

macro_rules! event_kinds {
    ($($kind:ident),*) => {$(
        impl From<$kind> for Event {
            fn from(e: $kind) -> Event {
                Event::$kind(e)
            }
        }
    )*};
}

event_kinds!(
    WorkflowStarted,
    WorkflowCompleted,
    WorkflowFailed,
    SignalReceived,
    ActivityStarted,
    ActivityCompleted,
    Handoff,
    HookEvent
);

impl Event {
    pub fn head(&self) -> &Head {
        match self {
            Event::WorkflowStarted(e) => &e.head,
            Event::WorkflowCompleted(e) => &e.head,
            Event::WorkflowFailed(e) => &e.head,
            Event::SignalReceived(e) => &e.head,
            Event::ActivityStarted(e) => &e.activity.head,
            Event::ActivityCompleted(e) => &e.activity.head,
            Event::Handoff(e) => &e.head,
            Event::HookEvent(e) => &e.activity.head,
        }
    }

    /// A hook event (§3.2), not a lifecycle event.
    pub fn is_hook(&self) -> bool {
        matches!(self, Event::HookEvent(_))
    }

    pub fn event_type(&self) -> &'static str {
        self.head().event_type
    }

    /// The activity fields of an activity event.
    pub fn activity(&self) -> Option<&ActivityHead> {
        match self {
            Event::ActivityStarted(e) => Some(&e.activity),
            Event::ActivityCompleted(e) => Some(&e.activity),
            Event::HookEvent(e) => Some(&e.activity),
            _ => None,
        }
    }

    pub fn task_queue(&self) -> Option<&str> {
        match self {
            Event::WorkflowStarted(e) => Some(&e.task_queue),
            Event::SignalReceived(e) => Some(&e.task_queue),
            other => other.activity().map(|a| a.task_queue.as_str()),
        }
    }

    pub fn signal_name(&self) -> Option<&str> {
        match self {
            Event::SignalReceived(e) => Some(&e.signal_name),
            _ => None,
        }
    }

    /// The activity's arguments (the signal's for SignalReceived).
    pub fn input(&self) -> Option<&[Value]> {
        match self {
            Event::ActivityStarted(e) => Some(&e.activity_input),
            Event::ActivityCompleted(e) => Some(&e.activity_input),
            Event::HookEvent(e) => Some(&e.activity_input),
            Event::SignalReceived(e) => Some(&e.signal_args),
            _ => None,
        }
    }

    /// The activity's or workflow's result.
    pub fn output(&self) -> Option<&Value> {
        match self {
            Event::ActivityCompleted(e) => Some(&e.activity_output),
            Event::WorkflowCompleted(e) => Some(&e.workflow_output),
            _ => None,
        }
    }

    /// The spans of ActivityCompleted, the operation of a hook event; none for the others.
    pub fn spans(&self) -> &[Span] {
        match self {
            Event::ActivityCompleted(e) => &e.spans,
            Event::HookEvent(e) => &e.operation,
            _ => &[],
        }
    }
}

pub fn workflow_started(wf: &WorkflowInfo, now: SystemTime) -> WorkflowStarted {
    WorkflowStarted {
        head: Head::new(
            WORKFLOW_STARTED,
            &wf.workflow_id,
            &wf.run_id,
            &wf.workflow_type,
        ),
        task_queue: wf.task_queue.clone(),
        timestamp: clock::rfc3339_millis(now),
        multi_agent_session_id: wf.multi_agent_session_id.clone(),
        activity_input: None,
    }
}

/// `workflow_output` is the serialized result (may be null).
pub fn workflow_completed(
    wf: &WorkflowInfo,
    workflow_output: Value,
    now: SystemTime,
) -> WorkflowCompleted {
    WorkflowCompleted {
        head: Head::new(
            WORKFLOW_COMPLETED,
            &wf.workflow_id,
            &wf.run_id,
            &wf.workflow_type,
        ),
        workflow_output,
        timestamp: clock::rfc3339_millis(now),
        multi_agent_session_id: wf.multi_agent_session_id.clone(),
    }
}

/// `error` as built by [`workflow_error`].
pub fn workflow_failed(wf: &WorkflowInfo, error: Value, now: SystemTime) -> WorkflowFailed {
    WorkflowFailed {
        head: Head::new(
            WORKFLOW_FAILED,
            &wf.workflow_id,
            &wf.run_id,
            &wf.workflow_type,
        ),
        error,
        timestamp: clock::rfc3339_millis(now),
        multi_agent_session_id: wf.multi_agent_session_id.clone(),
    }
}

pub fn signal_received(
    wf: &WorkflowInfo,
    signal_name: &str,
    signal_args: Vec<Value>,
    now: SystemTime,
) -> SignalReceived {
    SignalReceived {
        head: Head::new(
            SIGNAL_RECEIVED,
            &wf.workflow_id,
            &wf.run_id,
            &wf.workflow_type,
        ),
        task_queue: wf.task_queue.clone(),
        signal_name: signal_name.to_owned(),
        signal_args,
        timestamp: clock::rfc3339_millis(now),
        multi_agent_session_id: wf.multi_agent_session_id.clone(),
    }
}

/// The Handoff of `from_agent_did` in `session`, emitted by a workflow of run `wf`.
pub fn handoff(wf: &WorkflowInfo, from_agent_did: &str, session: &str, now: SystemTime) -> Handoff {
    Handoff {
        head: Head::new(HANDOFF, &wf.workflow_id, &wf.run_id, &wf.workflow_type),
        source: SOURCE,
        event_type: HANDOFF,
        from_agent_did: from_agent_did.to_owned(),
        multi_agent_session_id: session.to_owned(),
        timestamp: clock::rfc3339_millis(now),
    }
}

/// `activity_input` is always the array of positional arguments (`[]` for none).
pub fn activity_started(
    a: &ActivityInfo,
    activity_input: Vec<Value>,
    now: SystemTime,
) -> ActivityStarted {
    ActivityStarted {
        activity: ActivityHead::new(a, ACTIVITY_STARTED, now),
        activity_input,
    }
}

pub fn activity_completed(
    a: &ActivityInfo,
    c: ActivityCompletion,
    now: SystemTime,
) -> ActivityCompleted {
    // From the two instants, not from the two rounded floats (which would give 1200.0000476…).
    let duration_ms = match c.end_time.duration_since(c.start_time) {
        Ok(d) => d.as_secs_f64() * 1000.0,
        Err(e) => -e.duration().as_secs_f64() * 1000.0,
    };
    let failed = c.status == ActivityStatus::Failed;
    ActivityCompleted {
        activity: ActivityHead::new(a, ACTIVITY_COMPLETED, now),
        status: c.status,
        start_time: clock::unix_seconds(c.start_time),
        end_time: clock::unix_seconds(c.end_time),
        duration_ms,
        span_count: c.spans.len(),
        spans: c.spans,
        activity_input: c.activity_input,
        activity_output: if failed {
            Value::Null
        } else {
            c.activity_output
        },
        error: c.error,
    }
}

/// The event (an [`Event`] or one kind of them) as compact JSON bytes: the request body, a
/// spool line, a sink line.
pub fn encode(event: &impl Serialize) -> Vec<u8> {
    // Strings, numbers, spans and JSON values always serialize.
    serde_json::to_vec(event).unwrap_or_default()
}

/// What the governor needs of an event it only has the bytes of (a spooled one).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Spooled {
    #[serde(default)]
    pub event_type: String,
    #[serde(default)]
    pub workflow_id: String,
    #[serde(default)]
    pub run_id: String,
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
            multi_agent_session_id: None,
        }
    }

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn text(event: &impl Serialize) -> String {
        String::from_utf8(encode(event)).unwrap()
    }

    fn value(event: &impl Serialize) -> Value {
        serde_json::from_slice(&encode(event)).unwrap()
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
            spans: vec![crate::governance::testutil::span(
                "POST",
                json!({"http.method": "POST"}),
            )],
        };
        let span = serde_json::to_string(&c.spans[0]).unwrap();
        let ev = activity_completed(&info(), c, at(1_768_473_045_123));
        assert_eq!(
            text(&ev),
            format!(
                r#"{{"source":"workflow-telemetry","event_type":"ActivityCompleted","workflow_id":"wf-1","run_id":"r-1","workflow_type":"MyWorkflow","activity_id":"1","activity_type":"call_llm","task_queue":"q","attempt":1,"timestamp":"2026-01-15T10:30:45.123Z","status":"completed","start_time":1736937045.1,"end_time":1736937046.3,"duration_ms":1200.0,"span_count":1,"spans":[{span}],"activity_input":[{{"prompt":"hi"}}],"activity_output":{{"text":"hello"}},"error":null}}"#
            )
        );
    }

    #[test]
    fn the_multi_agent_session_rides_on_every_event_only_when_set_and_handoff_has_no_run() {
        let mut a = info();
        a.multi_agent_session_id = Some("s-1".into());
        let ev = activity_started(&a, vec![], at(0));
        assert_eq!(
            text(&ev),
            r#"{"source":"workflow-telemetry","event_type":"ActivityStarted","workflow_id":"wf-1","run_id":"r-1","workflow_type":"MyWorkflow","activity_id":"1","activity_type":"call_llm","task_queue":"q","attempt":1,"timestamp":"1970-01-01T00:00:00.000Z","multi_agent_session_id":"s-1","activity_input":[]}"#
        );
        let wf = WorkflowInfo {
            workflow_id: "wf-1".into(),
            run_id: "r-1".into(),
            workflow_type: "W".into(),
            task_queue: "q".into(),
            multi_agent_session_id: Some("s-1".into()),
        };
        let events: Vec<Event> = vec![
            workflow_started(&wf, at(0)).into(),
            workflow_completed(&wf, Value::Null, at(0)).into(),
            workflow_failed(&wf, json!({"type": "E", "message": "m"}), at(0)).into(),
            signal_received(&wf, "go", vec![], at(0)).into(),
        ];
        for ev in &events {
            assert_eq!(value(ev)["multi_agent_session_id"], "s-1", "{}", text(ev));
        }
        let none = WorkflowInfo {
            multi_agent_session_id: None,
            ..wf.clone()
        };
        assert!(!text(&workflow_started(&none, at(0))).contains("multi_agent_session_id"));
        let h = handoff(&wf, "did:example:a", "s-1", at(0));
        assert_eq!(
            text(&h),
            r#"{"source":"workflow-telemetry","event_type":"Handoff","from_agent_did":"did:example:a","multi_agent_session_id":"s-1","timestamp":"1970-01-01T00:00:00.000Z"}"#
        );
        // Kept for ordering and routing with the run, not sent.
        assert_eq!(Event::from(h).head().run_id, "r-1");
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
        let ev = value(&activity_completed(&info(), c, at(2000)));
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
            text(&ev),
            r#"{"source":"workflow-telemetry","event_type":"ActivityStarted","workflow_id":"wf-1","run_id":"r-1","workflow_type":"MyWorkflow","activity_id":"1","activity_type":"call_llm","task_queue":"q","attempt":1,"timestamp":"1970-01-01T00:00:00.000Z","activity_input":["a",2]}"#
        );
        let wf = WorkflowInfo {
            workflow_id: "w".into(),
            run_id: "r".into(),
            workflow_type: "T".into(),
            task_queue: "q".into(),
            multi_agent_session_id: None,
        };
        assert_eq!(
            text(&workflow_started(&wf, at(0))),
            r#"{"source":"workflow-telemetry","event_type":"WorkflowStarted","workflow_id":"w","run_id":"r","workflow_type":"T","task_queue":"q","timestamp":"1970-01-01T00:00:00.000Z"}"#
        );
        let done = value(&workflow_completed(&wf, Value::Null, at(0)));
        assert!(done.get("task_queue").is_none());
        assert_eq!(done["workflow_output"], Value::Null);
        let sig = signal_received(&wf, "approve", vec![json!(true)], at(0));
        assert_eq!(
            text(&sig),
            r#"{"source":"workflow-telemetry","event_type":"SignalReceived","workflow_id":"w","run_id":"r","workflow_type":"T","task_queue":"q","signal_name":"approve","signal_args":[true],"timestamp":"1970-01-01T00:00:00.000Z"}"#
        );
        let failed = value(&workflow_failed(
            &wf,
            workflow_error("ActivityError", "Activity task failed", None, None),
            at(0),
        ));
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
    fn spooled_bytes_give_back_the_run_an_event_is_about() {
        let wf = WorkflowInfo {
            workflow_id: "w".into(),
            run_id: "r".into(),
            workflow_type: "T".into(),
            task_queue: "q".into(),
            multi_agent_session_id: None,
        };
        let spooled: Spooled =
            serde_json::from_slice(&encode(&workflow_started(&wf, at(0)))).unwrap();
        assert_eq!(
            (
                spooled.event_type.as_str(),
                spooled.workflow_id.as_str(),
                spooled.run_id.as_str()
            ),
            (WORKFLOW_STARTED, "w", "r")
        );
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
