//! SDK 2.0 hook events (protocol §3.2): each operation of a governed activity — an HTTP
//! request, a database query, a file opened, a `@traced` function — is evaluated on its
//! own, once at the `started` stage and once at the `completed` stage, in a body that is
//! ActivityStarted with `hook_trigger: true` and the one operation as its span.
//!
//! The agent builds both stages from the span it captured, so the hook span has the same
//! `span_id` and `trace_id` as the span it exports over OTLP (one identity per operation).
//! What a stage does not know yet is null: at `started`, `end_time`, `duration_ns`, the
//! status code, the response and the row count.

use serde::Serialize;
use serde_json::{Map, Value};

use super::conventions::truncate_chars;
use crate::{
    protocol::StatusCode,
    span::{Span, Status},
};

/// `hook_type` (§3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HookType {
    HttpRequest,
    DbQuery,
    FileOperation,
    FunctionCall,
}

/// `stage` (§3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookStage {
    Started,
    Completed,
}

/// One span of a hook event, in SDK 2.0's flat shape: the common keys, then the fields
/// of its hook type, every one present (null when unknown).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HookSpan {
    pub span_id: String,
    pub trace_id: String,
    pub parent_span_id: Option<String>,
    pub name: String,
    pub kind: &'static str,
    pub stage: HookStage,
    pub hook_type: HookType,
    pub start_time: u64,
    pub end_time: Option<u64>,
    pub duration_ns: Option<u64>,
    pub attributes: Map<String, Value>,
    pub status: Status,
    pub events: Vec<Value>,
    pub error: Option<String>,
    /// The hook type's own fields (`http_method`, `db_statement`, `file_path`, …).
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// Request headers SDK 2.0 always replaces with `[REDACTED]` in hook spans, whatever the
/// agent's own redaction settings say.
const REDACTED_HEADERS: [&str; 8] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "x-amz-security-token",
];
const REDACTED: &str = "[REDACTED]";

/// Attributes that describe the outcome, left out at the `started` stage: the operation
/// has not answered yet as far as Core is told.
fn is_outcome_attribute(key: &str) -> bool {
    key == "http.status_code"
        || key.starts_with("http.response")
        || key.starts_with("gen_ai.response")
        || key.starts_with("gen_ai.usage")
        || key.starts_with("gen_ai.output")
        || key.starts_with("rpc.grpc.status")
        || key == "rpc.response.messages"
        || key == "db.rowcount"
        || key == "db.response_truncated"
        || key == "db.error.code"
        || key.starts_with("file.total_bytes")
}

/// The hook type of a captured span, or `None` when it is no operation SDK 2.0 governs:
/// a file's read/write children (the open stands for the file), an operation the worker
/// answered as a server.
pub fn hook_type_of(span: &Span) -> Option<HookType> {
    if span.name == "file.open" {
        return Some(HookType::FileOperation);
    }
    if span.kind != "CLIENT" {
        return None;
    }
    if span.attributes.contains_key("db.system") {
        Some(HookType::DbQuery)
    } else if span.attributes.contains_key("http.url") {
        Some(HookType::HttpRequest)
    } else {
        None
    }
}

/// `started` and `completed` spans of one captured operation. `parent` is the span of
/// its activity (the OTLP parent of a span that has none of its own); `body_limit` the
/// characters kept of each body (`max_body_size`).
pub fn stages(span: &Span, parent: &str, body_limit: usize) -> Option<[HookSpan; 2]> {
    let hook_type = hook_type_of(span)?;
    Some([
        hook_span(span, parent, hook_type, HookStage::Started, body_limit),
        hook_span(span, parent, hook_type, HookStage::Completed, body_limit),
    ])
}

/// What a `@traced` function reports at one stage (its hook's `hook_event` request).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FunctionCall {
    pub function: Value,
    pub module: Value,
    /// `{"args": […], "kwargs": {…}}`, or null when the decorator does not capture them.
    pub args: Value,
    /// Completed only: the serialised result (null when not captured or on failure).
    pub result: Value,
    /// Completed only: what the function raised.
    pub error: Option<String>,
}

/// One stage of a `@traced` function: `span` is the agent's span of the call (its ids,
/// times and status), `call` what the worker reported.
pub fn function_call(span: &Span, parent: &str, stage: HookStage, call: &FunctionCall) -> HookSpan {
    let mut h = hook_span(span, parent, HookType::FunctionCall, stage, 0);
    let done = stage == HookStage::Completed;
    h.fields.insert("function".into(), call.function.clone());
    h.fields.insert("module".into(), call.module.clone());
    h.fields.insert("args".into(), call.args.clone());
    h.fields.insert(
        "result".into(),
        if done {
            call.result.clone()
        } else {
            Value::Null
        },
    );
    if done {
        h.error = call.error.clone();
    }
    h
}

fn hook_span(
    span: &Span,
    parent: &str,
    hook_type: HookType,
    stage: HookStage,
    body_limit: usize,
) -> HookSpan {
    let done = stage == HookStage::Completed;
    let attr = |key: &str| span.attributes.get(key).cloned().unwrap_or(Value::Null);
    let mut fields = Map::new();
    let mut error = None;
    let mut name = span.name.clone();
    match hook_type {
        HookType::HttpRequest => {
            let status = span
                .attributes
                .get("http.status_code")
                .and_then(Value::as_u64);
            let method = match attr("http.method") {
                Value::Null => Value::String(span.name.clone()),
                m => m,
            };
            // SDK 2.0 names an HTTP hook span `HTTP <method>` (§3.2's example).
            name = format!("HTTP {}", method.as_str().unwrap_or(&span.name));
            fields.insert("http_method".into(), method);
            fields.insert("http_url".into(), attr("http.url"));
            fields.insert(
                "http_status_code".into(),
                status.filter(|_| done).map_or(Value::Null, Value::from),
            );
            fields.insert(
                "request_headers".into(),
                headers(span.request_headers.as_ref()),
            );
            fields.insert(
                "response_headers".into(),
                if done {
                    headers(span.response_headers.as_ref())
                } else {
                    Value::Null
                },
            );
            fields.insert(
                "request_body".into(),
                body(span.request_body.as_deref(), body_limit),
            );
            let response_body = span
                .response_body
                .as_deref()
                .filter(|_| done && textual_response(span));
            fields.insert("response_body".into(), body(response_body, body_limit));
            if done {
                error = status.filter(|s| *s >= 400).map(|s| format!("HTTP {s}"));
            }
        }
        HookType::DbQuery => {
            fields.insert("db_system".into(), attr("db.system"));
            fields.insert("db_name".into(), attr("db.name"));
            fields.insert("db_operation".into(), attr("db.operation"));
            fields.insert("db_statement".into(), attr("db.statement"));
            fields.insert("server_address".into(), attr("net.peer.name"));
            fields.insert("server_port".into(), attr("net.peer.port"));
            fields.insert(
                "rowcount".into(),
                if done {
                    attr("db.rowcount")
                } else {
                    Value::Null
                },
            );
            if done && span.status.code == StatusCode::Error {
                error = Some(
                    span.status
                        .description
                        .clone()
                        .unwrap_or_else(|| "error".to_owned()),
                );
            }
        }
        HookType::FileOperation => {
            let mode = span
                .attributes
                .get("file.mode")
                .and_then(Value::as_str)
                .unwrap_or("r");
            let operation = if mode.contains(['w', 'a', 'x', '+']) {
                "write"
            } else {
                "read"
            };
            // SDK 2.0 names a file span by what the mode allows.
            name = format!("file.{operation}");
            // SDK 2.0 reports 0 bytes as null.
            let total = |key: &str| {
                span.attributes
                    .get(key)
                    .and_then(Value::as_u64)
                    .filter(|n| done && *n > 0)
                    .map_or(Value::Null, Value::from)
            };
            fields.insert("file_path".into(), attr("file.path"));
            fields.insert("file_mode".into(), mode.into());
            fields.insert("file_operation".into(), operation.into());
            fields.insert("bytes_read".into(), total("file.total_bytes_read"));
            fields.insert("bytes_written".into(), total("file.total_bytes_written"));
        }
        HookType::FunctionCall => {
            // Filled by [`function_call`]: they come from the worker, not a capture.
            for key in ["function", "module", "args", "result"] {
                fields.insert(key.into(), Value::Null);
            }
        }
    }
    let attributes = span
        .attributes
        .iter()
        .filter(|(k, _)| done || !is_outcome_attribute(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    HookSpan {
        span_id: span.span_id.clone(),
        trace_id: span.trace_id.clone(),
        parent_span_id: Some(
            span.parent_span_id
                .clone()
                .unwrap_or_else(|| parent.to_owned()),
        ),
        name,
        kind: span.kind,
        stage,
        hook_type,
        start_time: span.start_time,
        end_time: done.then_some(span.end_time),
        duration_ns: if done { span.duration_ns } else { None },
        attributes,
        status: if done {
            span.status.clone()
        } else {
            Status {
                code: StatusCode::Unset,
                description: None,
            }
        },
        events: if done {
            span.events.clone()
        } else {
            Vec::new()
        },
        error,
        fields,
    }
}

fn headers(h: Option<&Map<String, Value>>) -> Value {
    let Some(h) = h else {
        return Value::Null;
    };
    let mut out = Map::with_capacity(h.len());
    for (name, value) in h {
        let secret = REDACTED_HEADERS
            .iter()
            .any(|s| s.eq_ignore_ascii_case(name));
        out.insert(
            name.clone(),
            if secret {
                REDACTED.into()
            } else {
                value.clone()
            },
        );
    }
    Value::Object(out)
}

fn body(b: Option<&str>, limit: usize) -> Value {
    match b {
        Some(b) => {
            let mut b = b.to_owned();
            truncate_chars(&mut b, limit);
            Value::String(b)
        }
        None => Value::Null,
    }
}

/// SDK 2.0 keeps a response body when its content type contains `json`, `text` or `xml`,
/// or when there is none.
fn textual_response(span: &Span) -> bool {
    let content_type = span
        .response_headers
        .as_ref()
        .and_then(|h| h.get("content-type"))
        .and_then(Value::as_str);
    match content_type {
        None => true,
        Some(t) => {
            let t = t.to_ascii_lowercase();
            ["json", "text", "xml"].iter().any(|k| t.contains(k))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::governance::testutil;

    fn http() -> Span {
        let mut s = testutil::span(
            "POST",
            json!({"http.method": "POST", "http.url": "https://api.example/v1?x=1",
                "http.status_code": 503, "http.response.body.decoded": true}),
        );
        s.request_headers = Some(
            json!({"authorization": "Bearer s", "x-api-key": "k", "cookie": "c",
                "content-type": "application/json"})
            .as_object()
            .unwrap()
            .clone(),
        );
        s.response_headers = Some(
            json!({"set-cookie": "a=b", "content-type": "text/plain; charset=utf-8"})
                .as_object()
                .unwrap()
                .clone(),
        );
        s.request_body = Some("é".repeat(10));
        s.response_body = Some("busy".into());
        s
    }

    #[test]
    fn http_stages_carry_every_field_with_nulls_at_started_and_secrets_redacted() {
        let [started, completed] = stages(&http(), "00000000000000ff", 4).unwrap();
        let s = serde_json::to_value(&started).unwrap();
        assert_eq!(s["stage"], "started");
        assert_eq!(s["hook_type"], "http_request");
        assert_eq!(s["parent_span_id"], "00000000000000ff");
        for key in [
            "end_time",
            "duration_ns",
            "error",
            "http_status_code",
            "response_headers",
            "response_body",
        ] {
            assert!(s[key].is_null(), "{key} at started: {}", s[key]);
            assert!(s.get(key).is_some(), "{key} present");
        }
        assert_eq!(s["http_method"], "POST");
        assert_eq!(s["request_body"], "éééé", "cut at max_body_size characters");
        assert_eq!(s["request_headers"]["authorization"], "[REDACTED]");
        assert_eq!(s["request_headers"]["x-api-key"], "[REDACTED]");
        assert_eq!(s["request_headers"]["cookie"], "[REDACTED]");
        assert_eq!(s["request_headers"]["content-type"], "application/json");
        assert!(s["attributes"].get("http.status_code").is_none());
        assert_eq!(s["status"], json!({"code": "UNSET", "description": null}));
        let c = serde_json::to_value(&completed).unwrap();
        assert_eq!(c["stage"], "completed");
        assert_eq!(c["http_status_code"], 503);
        assert_eq!(c["error"], "HTTP 503");
        assert_eq!(c["end_time"], 2_000);
        assert_eq!(c["duration_ns"], 1_000);
        assert_eq!(c["response_body"], "busy");
        assert_eq!(c["response_headers"]["set-cookie"], "[REDACTED]");
        assert_eq!(c["span_id"], s["span_id"], "one identity per operation");
    }

    #[test]
    fn binary_response_bodies_are_left_out() {
        let mut span = http();
        span.response_headers = Some(
            json!({"content-type": "image/png"})
                .as_object()
                .unwrap()
                .clone(),
        );
        let [_, c] = stages(&span, "f", 100).unwrap();
        assert_eq!(
            serde_json::to_value(&c).unwrap()["response_body"],
            Value::Null
        );
        span.response_headers = None;
        let [_, c] = stages(&span, "f", 100).unwrap();
        assert_eq!(serde_json::to_value(&c).unwrap()["response_body"], "busy");
    }

    #[test]
    fn db_and_file_stages_name_their_fields() {
        let mut q = testutil::span(
            "SELECT",
            json!({"db.system": "postgresql", "db.name": "app", "db.operation": "SELECT",
                "db.statement": "SELECT 1", "net.peer.name": "10.0.0.1", "net.peer.port": 5432,
                "db.rowcount": 1}),
        );
        let [s, c] = stages(&q, "f", 100).unwrap();
        let (s, c) = (
            serde_json::to_value(&s).unwrap(),
            serde_json::to_value(&c).unwrap(),
        );
        assert_eq!(s["hook_type"], "db_query");
        assert_eq!(s["db_statement"], "SELECT 1");
        assert_eq!(s["server_port"], 5432);
        assert!(s["rowcount"].is_null());
        assert_eq!(c["rowcount"], 1);
        q.kind = "SERVER";
        assert!(stages(&q, "f", 100).is_none(), "the worker as a server");

        let mut f = testutil::span(
            "file.open",
            json!({"file.path": "/tmp/x", "file.mode": "w", "file.total_bytes_read": 0,
                "file.total_bytes_written": 5}),
        );
        f.kind = "INTERNAL";
        let [s, c] = stages(&f, "f", 100).unwrap();
        let (s, c) = (
            serde_json::to_value(&s).unwrap(),
            serde_json::to_value(&c).unwrap(),
        );
        assert_eq!(s["name"], "file.write");
        assert_eq!(s["file_operation"], "write");
        assert!(s["bytes_written"].is_null());
        assert_eq!(c["bytes_written"], 5);
        assert!(
            c["bytes_read"].is_null(),
            "0 bytes is null, as SDK 2.0 sends it"
        );
        let mut child = f.clone();
        child.name = "file.write".into();
        assert!(
            stages(&child, "f", 100).is_none(),
            "the open stands for the file"
        );
    }
}
