//! The hook ↔ agent protocol: what a worker hook may ask and what it is answered.
//!
//! One compact JSON object per line each way (see [`super::hook`] for the framing).
//! Requests are `{"id": <int>, "op": <name>, ...}`; replies carry the request's `id` and
//! `"ok"`, then either the answer's fields or `"error"`. The same messages are described
//! by `hooks/protocol/hook-agent.schema.json`, which the Rust tests and the Python hook's
//! tests both validate real messages against.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::{
    conn::Pid,
    governance::{events, hook_events::HookStage, verdict::Decision},
};

/// One request, by its `op`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Hello(Hello),
    Thread(Thread),
    ActivityStart(ActivityStart),
    ActivityEnd(ActivityEnd),
    WorkflowEvent(WorkflowEvent),
    HookEvent(HookEvent),
    Enforce(Enforce),
}

/// The ops [`Request`] knows, for telling an unknown op from a malformed known one.
pub const OPS: [&str; 7] = [
    "hello",
    "thread",
    "activity_start",
    "activity_end",
    "workflow_event",
    "hook_event",
    "enforce",
];

/// Registers the connection's process as a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The pid the worker knows itself by; checked against the kernel's word.
    #[serde(default)]
    pub pid: Option<u64>,
    /// `openbox-hook/<version>`, logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    /// Address of the slot table in the worker's memory, and its length in slots.
    #[serde(default)]
    pub slots_addr: u64,
    #[serde(default)]
    pub slots: u64,
    /// The SDK governance settings given to `create_openbox_worker` (an object; parsed
    /// by `governance::config::WorkerSettings`, whose errors halt the worker's activities
    /// rather than refuse its registration).
    #[serde(default)]
    pub config: Value,
    /// Not a worker but a process its activities hand work to (a process pool's worker):
    /// its threads publish the tokens of the registered worker it descends from, and it
    /// may only register threads.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub helper: bool,
}

/// Tells the agent which slot a thread of the worker publishes its activity in.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thread {
    /// The thread's id in the worker's PID namespace.
    pub tid: u64,
    pub slot: u64,
}

/// Hands the agent the seccomp listener of a thread's filter (`run --enforce`, see
/// `daemon::enforce`): the agent takes descriptor `fd` of the worker with `pidfd_getfd`
/// and answers the thread's held calls from then on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Enforce {
    /// The thread's id in the worker's PID namespace.
    pub tid: u64,
    /// Its slot (as in `thread`).
    pub slot: u64,
    /// The listener's descriptor number in the worker.
    pub fd: i32,
}

/// An activity execution begins; answered with its token once governed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivityStart {
    #[serde(flatten)]
    pub activity: events::ActivityInfo,
    /// The positional arguments, serialised by the hook (`null` or absent: none).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub input: Vec<Value>,
    /// Unix seconds, from the worker; the agent's clock when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<f64>,
    /// The W3C trace context current in the worker when the activity started (its own
    /// tracing, e.g. Temporal's `TracingInterceptor`): the agent's spans join that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// An activity execution ended; answered with the span count once governed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivityEnd {
    pub token: u64,
    /// `completed` when absent.
    #[serde(default = "completed")]
    pub status: events::ActivityStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<f64>,
    /// The arguments the activity really ran with (after input redaction); hooks that
    /// do not send them get the ones it started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Vec<Value>>,
    /// The serialised result (ignored when the activity failed).
    #[serde(default)]
    pub output: Value,
    #[serde(default)]
    pub error: Option<events::ActivityError>,
}

fn completed() -> events::ActivityStatus {
    events::ActivityStatus::Completed
}

/// One stage of a `@traced` function call of a running activity (SDK 2.0's
/// `function_call` hook type). The agent sends it to Core as a hook event when the
/// worker's operations go out as hook events; `started` is answered with the verdict,
/// `completed` at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookEvent {
    pub token: u64,
    pub stage: HookStage,
    /// Only `function_call`: the agent captures the other operations itself.
    pub hook_type: String,
    /// The span name's subject (`name=` of the decorator, else the function's qualified name).
    #[serde(default)]
    pub name: Option<String>,
    /// `completed`: the span id the `started` answer gave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    #[serde(default)]
    pub function: Value,
    #[serde(default)]
    pub module: Value,
    #[serde(default)]
    pub args: Value,
    #[serde(default)]
    pub result: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A workflow event from the hook's workflow interceptor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowEvent {
    #[serde(flatten)]
    pub workflow: events::WorkflowInfo,
    #[serde(flatten)]
    pub event: WorkflowEventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type")]
pub enum WorkflowEventKind {
    WorkflowStarted {
        /// The run this one continues (continue-as-new, retry, cron): its trace is linked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        continued_run_id: Option<String>,
        /// The workflow's arguments (serialised, as an array); sent to Core under SDK 2.0
        /// conventions only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        activity_input: Option<Vec<Value>>,
    },
    WorkflowCompleted {
        #[serde(default)]
        workflow_output: Value,
    },
    WorkflowFailed {
        /// The §2.3 error object the hook built.
        #[serde(default)]
        error: Value,
    },
    /// The run continued as new: its trace span ends. Local to the agent — Core gets no
    /// event for it, as with the SDK.
    WorkflowContinuedAsNew {},
    SignalReceived {
        #[serde(default)]
        signal_name: String,
        #[serde(default, deserialize_with = "null_as_empty")]
        signal_args: Vec<Value>,
    },
    /// `emit_handoff()` in a workflow (SDK 2.0, §2.4); the session is the workflow info's
    /// `multi_agent_session_id`, required here.
    Handoff { from_agent_did: String },
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Value>, D::Error> {
    Ok(Option::<Vec<Value>>::deserialize(d)?.unwrap_or_default())
}

/// A request line that is not a request the agent understands.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest {
    /// What is wrong is said even before `hello` (a line that is no JSON object, a
    /// malformed `hello`); otherwise the peer is first told to say `hello`.
    pub before_hello: bool,
    pub error: String,
}

/// Reads one request line: its `id` (echoed in the reply whatever it is, `null` when
/// absent) and the request or why it is not one.
pub fn parse(line: &[u8]) -> (Value, Result<Request, BadRequest>) {
    let mut value: Value = match serde_json::from_slice(line) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            let error = "a request is one JSON object per line".to_string();
            let bad = BadRequest {
                before_hello: true,
                error,
            };
            return (Value::Null, Err(bad));
        }
    };
    let id = value
        .as_object_mut()
        .and_then(|m| m.remove("id"))
        .unwrap_or(Value::Null);
    let op = value.get("op").and_then(Value::as_str).map(str::to_string);
    let request = match op.as_deref() {
        Some(name) if OPS.contains(&name) => Request::deserialize(value)
            .map_err(|e| format!("{name}: {e}"))
            .and_then(Request::checked)
            .map_err(|error| BadRequest {
                before_hello: name == "hello",
                error,
            }),
        _ => Err(BadRequest {
            before_hello: false,
            error: format!("unknown op {:?}", op.as_deref().unwrap_or("")),
        }),
    };
    (id, request)
}

impl Request {
    /// What the types alone do not say.
    fn checked(self) -> Result<Request, String> {
        match &self {
            Request::ActivityStart(a) if a.activity.attempt < 1 => {
                Err("activity_start needs `attempt` (an integer ≥ 1)".into())
            }
            Request::HookEvent(h) if h.hook_type != "function_call" => Err(format!(
                "hook_event: hook_type {:?} is not one a hook reports (only function_call; \
                 the agent captures HTTP, database and file operations itself)",
                h.hook_type
            )),
            Request::HookEvent(HookEvent {
                stage: HookStage::Completed,
                span_id: None,
                ..
            }) => Err(
                "hook_event: a completed stage needs the `span_id` its started stage was given"
                    .into(),
            ),
            Request::WorkflowEvent(WorkflowEvent {
                workflow,
                event: WorkflowEventKind::Handoff { from_agent_did },
            }) if from_agent_did.trim().is_empty()
                || workflow
                    .multi_agent_session_id
                    .as_deref()
                    .is_none_or(|s| s.trim().is_empty()) =>
            {
                Err(
                    "Handoff needs a non-empty `from_agent_did` and `multi_agent_session_id`"
                        .into(),
                )
            }
            _ => Ok(self),
        }
    }
}

/// What a request is answered with when it succeeded.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Hello {
        /// `openbox-agent/<version>`.
        agent: String,
        /// The worker's host pid.
        worker: Pid,
    },
    Thread {
        host_tid: u32,
        /// The agent holds this worker's operations until Core answers (`run --enforce`):
        /// the thread installs its seccomp filter and sends `enforce`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        enforce: bool,
    },
    ActivityStart {
        token: u64,
        decision: Decision,
    },
    ActivityEnd {
        span_count: usize,
        spans_dropped: u64,
        decision: Decision,
        /// Calls of the activity the agent denied in the kernel (`run --enforce`).
        #[serde(default, skip_serializing_if = "is_zero")]
        operations_denied: u64,
    },
    /// `hook_event`: the call's span (`None` when the worker's operations do not go out
    /// as hook events: the decorator lets the call through) and, at `started`, what to do.
    HookEvent {
        span_id: Option<String>,
        decision: Decision,
    },
    /// `workflow_event`: nothing but `ok`, sent once the event is safe (delivered to Core
    /// or fsync'd in the spool).
    Accepted {},
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One reply line: `{"id", "ok": true, ...answer}` or `{"id", "ok": false, "error"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reply {
    pub id: Value,
    pub ok: bool,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub answer: Option<Answer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn new(id: Value, result: Result<Answer, String>) -> Reply {
        match result {
            Ok(answer) => Reply {
                id,
                ok: true,
                answer: Some(answer),
                error: None,
            },
            Err(error) => Reply {
                id,
                ok: false,
                answer: None,
                error: Some(error),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn every_op_the_hook_sends_parses_and_ids_come_back_as_sent() {
        let line = br#"{"id":7,"op":"activity_end","token":3,"status":"failed","end_time":2.5,"input":[1],"output":null,"error":{"type":"ValueError","message":"bad"}}"#;
        let (id, req) = parse(line);
        assert_eq!(id, json!(7));
        let Request::ActivityEnd(end) = req.unwrap() else {
            panic!("not activity_end")
        };
        assert_eq!(end.status, events::ActivityStatus::Failed);
        assert_eq!(end.error.unwrap().kind, "ValueError");
        let (id, req) = parse(br#"{"id":"x","op":"workflow_event","event_type":"SignalReceived","workflow_id":"w","run_id":"r","workflow_type":"T","signal_name":"go","signal_args":null}"#);
        assert_eq!(id, json!("x"));
        let Request::WorkflowEvent(ev) = req.unwrap() else {
            panic!("not workflow_event")
        };
        assert_eq!(
            ev.event,
            WorkflowEventKind::SignalReceived {
                signal_name: "go".into(),
                signal_args: vec![]
            }
        );
        assert_eq!(ev.workflow.task_queue, "");
        let (_, req) = parse(br#"{"id":9,"op":"workflow_event","event_type":"WorkflowContinuedAsNew","workflow_id":"w","run_id":"r","workflow_type":"T"}"#);
        let Request::WorkflowEvent(ev) = req.unwrap() else {
            panic!("not workflow_event")
        };
        assert_eq!(ev.event, WorkflowEventKind::WorkflowContinuedAsNew {});
    }

    #[test]
    fn the_session_and_handoff_parse_and_a_handoff_needs_both_fields() {
        let (_, req) = parse(br#"{"id":1,"op":"workflow_event","event_type":"Handoff","workflow_id":"w","run_id":"r","workflow_type":"T","from_agent_did":"did:example:a","multi_agent_session_id":"s-1"}"#);
        let Request::WorkflowEvent(ev) = req.unwrap() else {
            panic!("not workflow_event")
        };
        assert_eq!(
            ev.event,
            WorkflowEventKind::Handoff {
                from_agent_did: "did:example:a".into()
            }
        );
        assert_eq!(ev.workflow.multi_agent_session_id.as_deref(), Some("s-1"));
        for bad in [
            &br#"{"id":1,"op":"workflow_event","event_type":"Handoff","workflow_id":"w","run_id":"r","from_agent_did":"did:example:a"}"#[..],
            br#"{"id":1,"op":"workflow_event","event_type":"Handoff","workflow_id":"w","run_id":"r","from_agent_did":" ","multi_agent_session_id":"s"}"#,
        ] {
            let err = parse(bad).1.unwrap_err().error;
            assert!(err.contains("Handoff needs"), "{err}");
        }
        let (_, req) = parse(br#"{"id":2,"op":"activity_start","workflow_id":"w","run_id":"r","workflow_type":"T","activity_id":"1","activity_type":"a","task_queue":"q","attempt":1,"multi_agent_session_id":"s-1"}"#);
        let Request::ActivityStart(start) = req.unwrap() else {
            panic!("not activity_start")
        };
        assert_eq!(
            start.activity.multi_agent_session_id.as_deref(),
            Some("s-1")
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong_and_keep_their_op() {
        let (id, req) = parse(b"not json");
        assert_eq!(id, Value::Null);
        assert!(req.unwrap_err().error.contains("one JSON object per line"));
        let (id, req) = parse(br#"{"id":2,"op":"dance"}"#);
        assert_eq!(id, json!(2));
        assert_eq!(req.unwrap_err().error, r#"unknown op "dance""#);
        let err = parse(br#"{"id":3,"op":"thread","tid":1}"#).1.unwrap_err();
        assert!(!err.before_hello);
        assert!(err.error.contains("slot"), "{}", err.error);
        let err = parse(br#"{"op":"workflow_event","event_type":"Nope","workflow_id":"w","run_id":"r","workflow_type":"T"}"#).1.unwrap_err();
        assert!(err.error.contains("Nope"), "{}", err.error);
    }

    #[test]
    fn activity_start_requests_name_what_is_missing() {
        let ok = json!({"op":"activity_start","workflow_id":"w","run_id":"r","workflow_type":"W","activity_id":"1",
            "activity_type":"t","task_queue":"q","attempt":2,"input":[1,"x"]});
        let Ok(Request::ActivityStart(start)) = parse(ok.to_string().as_bytes()).1 else {
            panic!("not activity_start")
        };
        assert_eq!(
            (start.activity.attempt, json!(start.input)),
            (2, json!([1, "x"]))
        );
        let mut bad = ok.clone();
        bad.as_object_mut().unwrap().remove("run_id");
        let err = parse(bad.to_string().as_bytes()).1.unwrap_err();
        assert!(err.error.contains("run_id"), "{}", err.error);
        let mut bad = ok;
        bad["attempt"] = json!(0);
        let err = parse(bad.to_string().as_bytes()).1.unwrap_err();
        assert!(err.error.contains("attempt"), "{}", err.error);
    }

    #[test]
    fn replies_put_the_answer_beside_id_and_ok() {
        let r = Reply::new(
            json!(4),
            Ok(Answer::Thread {
                host_tid: 9,
                enforce: false,
            }),
        );
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"id": 4, "ok": true, "host_tid": 9})
        );
        let r = Reply::new(json!(5), Ok(Answer::Accepted {}));
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"id": 5, "ok": true})
        );
        let r = Reply::new(Value::Null, Err("no".into()));
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"id": null, "ok": false, "error": "no"})
        );
    }

    /// The protocol schema both sides' tests validate against, narrowed to one definition.
    fn schema(definition: &str) -> jsonschema::Validator {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../hooks/protocol/hook-agent.schema.json"
        );
        let text = std::fs::read_to_string(path).expect("the protocol schema");
        let doc: Value = serde_json::from_str(&text).expect("the protocol schema is JSON");
        jsonschema::draft202012::meta::validate(&doc)
            .expect("the protocol schema is a valid schema");
        let narrowed = json!({"$ref": format!("#/$defs/{definition}"), "$defs": doc["$defs"]});
        jsonschema::draft202012::new(&narrowed).expect("the protocol schema compiles")
    }

    fn assert_valid(validator: &jsonschema::Validator, what: &str, message: &Value) {
        let errors: Vec<String> = validator
            .iter_errors(message)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{what} {message} is off the protocol: {errors:?}"
        );
    }

    /// Messages the Python hook really sent (recorded from its test suite, see
    /// hooks/protocol/README.md): each is valid, parses, and says the same once the
    /// agent's types write it back.
    #[test]
    fn the_hooks_recorded_requests_follow_the_schema_and_parse() {
        let requests = schema("request");
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../hooks/protocol/recorded-requests.jsonl"
        );
        let text = std::fs::read_to_string(path).expect("the recorded hook requests");
        let mut ops = std::collections::BTreeSet::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let sent: Value = serde_json::from_str(line).unwrap();
            assert_valid(&requests, "recorded request", &sent);
            let (id, req) = parse(line.as_bytes());
            let req = req.unwrap_or_else(|e| panic!("{line}: {}", e.error));
            assert_eq!(id, sent["id"]);
            let mut written = serde_json::to_value(&req).unwrap();
            written["id"] = id;
            assert_valid(&requests, "re-serialized request", &written);
            assert_eq!(
                parse(written.to_string().as_bytes()).1.unwrap(),
                req,
                "{line}"
            );
            ops.insert(format!(
                "{} {}",
                sent["op"],
                sent.get("event_type").unwrap_or(&Value::Null)
            ));
        }
        assert_eq!(
            ops.len(),
            8,
            "every op and workflow event type is recorded: {ops:?}"
        );
    }

    /// `@traced` stages as the hook sends them: valid, parsed; other hook types and a
    /// completed stage without its span id are refused with the reason.
    #[test]
    fn hook_event_requests_follow_the_schema_and_only_function_calls_are_taken() {
        let requests = schema("request");
        for line in [
            r#"{"id":3,"op":"hook_event","token":7,"stage":"started","hook_type":"function_call","name":"score","function":"score","module":"app","args":{"args":[1],"kwargs":{"w":2}}}"#,
            r#"{"id":4,"op":"hook_event","token":7,"stage":"completed","hook_type":"function_call","span_id":"00f067aa0ba902b7","function":"score","module":null,"result":{"ok":true}}"#,
            r#"{"id":5,"op":"hook_event","token":7,"stage":"completed","hook_type":"function_call","span_id":"00f067aa0ba902b7","function":"score","error":"boom"}"#,
        ] {
            let sent: Value = serde_json::from_str(line).unwrap();
            assert_valid(&requests, "hook_event", &sent);
            let (_, req) = parse(line.as_bytes());
            let Ok(Request::HookEvent(h)) = req else {
                panic!("{line}: {req:?}")
            };
            assert_eq!(h.token, 7);
        }
        let (_, req) = parse(
            br#"{"id":6,"op":"hook_event","token":7,"stage":"started","hook_type":"http_request"}"#,
        );
        let e = req.unwrap_err().error;
        assert!(e.contains("only function_call"), "{e}");
        let (_, req) = parse(br#"{"id":7,"op":"hook_event","token":7,"stage":"completed","hook_type":"function_call","function":"f"}"#);
        let e = req.unwrap_err().error;
        assert!(e.contains("span_id"), "{e}");
    }

    #[test]
    fn every_reply_the_agent_writes_follows_the_schema() {
        use crate::governance::verdict::{ArgRedaction, ErrorType, Redaction, Verdict};
        let decisions = [
            Decision::allow_without_verdict(),
            Decision::Continue {
                verdict: Some(Verdict::Constrain),
                constrained: true,
                redaction: Some(Redaction::Input {
                    args: vec![ArgRedaction {
                        index: 0,
                        value: json!({"card": "[REDACTED]"}).as_object().unwrap().clone(),
                    }],
                }),
            },
            Decision::Continue {
                verdict: Some(Verdict::Allow),
                constrained: false,
                redaction: Some(Redaction::Output { value: json!("x") }),
            },
            Decision::fail(ErrorType::GovernanceHalt, "Governance API error: down"),
            Decision::ApprovalPending {
                message: "Approval required".into(),
            },
        ];
        let replies = [
            (
                "hello",
                Answer::Hello {
                    agent: "openbox-agent/0.1.0".into(),
                    worker: 42,
                },
            ),
            (
                "thread",
                Answer::Thread {
                    host_tid: 43,
                    enforce: true,
                },
            ),
            (
                "enforce",
                Answer::Thread {
                    host_tid: 43,
                    enforce: true,
                },
            ),
            ("workflow_event", Answer::Accepted {}),
        ]
        .into_iter()
        .chain(decisions.iter().flat_map(|d| {
            [
                (
                    "activity_start",
                    Answer::ActivityStart {
                        token: 1,
                        decision: d.clone(),
                    },
                ),
                (
                    "activity_end",
                    Answer::ActivityEnd {
                        span_count: 2,
                        spans_dropped: 0,
                        decision: d.clone(),
                        operations_denied: 1,
                    },
                ),
                (
                    "hook_event",
                    Answer::HookEvent {
                        span_id: Some("00f067aa0ba902b7".into()),
                        decision: d.clone(),
                    },
                ),
            ]
        }))
        .chain([(
            "hook_event",
            Answer::HookEvent {
                span_id: None,
                decision: Decision::allow_without_verdict(),
            },
        )]);
        for (op, answer) in replies {
            let reply = serde_json::to_value(Reply::new(json!(9), Ok(answer))).unwrap();
            assert_valid(&schema(&format!("{op}_reply")), op, &reply);
            assert_valid(&schema("reply"), op, &reply);
        }
        for id in [json!(3), Value::Null] {
            let reply =
                serde_json::to_value(Reply::new(id, Err("send `hello` first".into()))).unwrap();
            assert_valid(&schema("error_reply"), "error", &reply);
        }
    }
}
