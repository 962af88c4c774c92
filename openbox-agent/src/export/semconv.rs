//! Captured spans as OpenTelemetry spans: the SDK's attribute names (what Core reads,
//! openbox-core-protocol.md §3.1) become the stable semantic-convention names
//! (`http.request.method`, `url.full`, `db.system.name`, `db.query.text`, …); the
//! process and its container become the span's resource.
//!
//! Names without a stable counterpart pass through as they are, so attributes other
//! stages add (`gen_ai.*`, `file.*`) reach the backend unchanged.

use std::{borrow::Cow, time::SystemTime};

use opentelemetry::{
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
    Array, KeyValue, StringValue, Value as OtelValue,
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use opentelemetry_semantic_conventions::attribute as sc;
use serde_json::{Map, Value};

use super::otlp::{scope, Resource};
use crate::{protocol::StatusCode, span::Span};

/// Core's name → the stable name, for attributes whose value carries over as it is.
const RENAMED: &[(&str, &str)] = &[
    ("http.method", sc::HTTP_REQUEST_METHOD),
    ("http.url", sc::URL_FULL),
    ("http.scheme", sc::URL_SCHEME),
    ("http.status_code", sc::HTTP_RESPONSE_STATUS_CODE),
    ("db.statement", sc::DB_QUERY_TEXT),
    ("db.name", sc::DB_NAMESPACE),
    ("db.operation", sc::DB_OPERATION_NAME),
    ("db.mongodb.collection", sc::DB_COLLECTION_NAME),
    ("db.rowcount", sc::DB_RESPONSE_RETURNED_ROWS),
];

/// Core names the stable conventions cover otherwise (below) or dropped: `http.host`
/// is `server.address` + `server.port`; `http.target` is `url.path` + `url.query`.
const REPLACED: &[&str] = &[
    "http.host",
    "http.target",
    "net.peer.name",
    "net.peer.port",
    "net.transport",
    "db.system",
    "db.error.code",
    "db.redis.database_index",
];

/// Span attributes that describe where the span was made: they go to the resource.
const RESOURCE_KEYS: &[&str] = &[
    sc::CONTAINER_ID,
    sc::K8S_POD_UID,
    "k8s.pod.name",
    "k8s.namespace.name",
];

/// Where an exported span hangs in its trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub trace_id: String,
    /// The parent of a span that has none of its own (an activity span, a command's
    /// root); `None`: such spans are roots.
    pub parent: Option<String>,
}

/// The resource of a span made by process `pid`: the process, and the container and
/// pod the span names.
pub fn resource_of(span: &Span) -> Resource {
    let mut attrs = vec![KeyValue::new(sc::PROCESS_PID, i64::from(span.pid))];
    for key in RESOURCE_KEYS {
        if let Some(Value::String(v)) = span.attributes.get(*key) {
            attrs.push(KeyValue::new(*key, v.clone()));
        }
    }
    Resource::new(attrs)
}

/// One captured span as the OTLP exporter takes it, under `at`.
pub fn span_data(span: &Span, at: &Placement) -> SpanData {
    let trace_id = TraceId::from_hex(&at.trace_id).unwrap_or(TraceId::INVALID);
    let span_id = SpanId::from_hex(&span.span_id).unwrap_or(SpanId::INVALID);
    let parent = span
        .parent_span_id
        .as_deref()
        .or(at.parent.as_deref())
        .and_then(|p| SpanId::from_hex(p).ok())
        .unwrap_or(SpanId::INVALID);
    let kind = match span.kind {
        "CLIENT" => SpanKind::Client,
        "SERVER" => SpanKind::Server,
        "PRODUCER" => SpanKind::Producer,
        "CONSUMER" => SpanKind::Consumer,
        _ => SpanKind::Internal,
    };
    SpanData {
        span_context: SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: parent,
        parent_span_is_remote: false,
        span_kind: kind.clone(),
        name: Cow::Owned(span.name.clone()),
        start_time: epoch(span.start_time),
        end_time: epoch(span.end_time),
        attributes: attributes(span, &kind),
        dropped_attributes_count: 0,
        events: events(&span.events),
        links: SpanLinks::default(),
        status: status(span),
        instrumentation_scope: scope(),
    }
}

fn epoch(ns: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(ns)
}

fn status(span: &Span) -> Status {
    match span.status.code {
        StatusCode::Error => Status::error(span.status.description.clone().unwrap_or_default()),
        StatusCode::Ok => Status::Ok,
        StatusCode::Unset => Status::Unset,
    }
}

/// The span's attributes under the stable names, its headers as
/// `http.{request,response}.header.<name>`, its bodies under `openbox.http.*.body`.
fn attributes(span: &Span, kind: &SpanKind) -> Vec<KeyValue> {
    let a = &span.attributes;
    let mut out = Vec::with_capacity(a.len() + 8);
    for (k, v) in a {
        if REPLACED.contains(&k.as_str()) || RESOURCE_KEYS.contains(&k.as_str()) {
            continue;
        }
        let key = RENAMED
            .iter()
            .find(|(old, _)| *old == k)
            .map(|(_, new)| Cow::Borrowed(*new))
            .unwrap_or_else(|| Cow::Owned(k.clone()));
        if let Some(v) = value(v) {
            out.push(KeyValue::new(key, v));
        }
    }
    // The peer: the server for a client span, the client for a server span.
    let (addr_key, port_key) = match kind {
        SpanKind::Server => (sc::CLIENT_ADDRESS, sc::CLIENT_PORT),
        _ => (sc::SERVER_ADDRESS, sc::SERVER_PORT),
    };
    if let Some(name) = a.get("net.peer.name").and_then(Value::as_str) {
        out.push(KeyValue::new(addr_key, name.to_string()));
    }
    if let Some(port) = a.get("net.peer.port").and_then(Value::as_i64) {
        out.push(KeyValue::new(port_key, port));
    }
    if a.get("net.transport").and_then(Value::as_str) == Some("ip_tcp") {
        out.push(KeyValue::new(sc::NETWORK_TRANSPORT, "tcp"));
    }
    if let Some(target) = a.get("http.target").and_then(Value::as_str) {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        // An absolute-form target (a proxy request) is the URL; its path is in url.full.
        if path.starts_with('/') {
            out.push(KeyValue::new(sc::URL_PATH, path.to_string()));
        }
        if let Some(q) = query {
            out.push(KeyValue::new(sc::URL_QUERY, q.to_string()));
        }
    }
    if let Some(system) = a.get("db.system").and_then(Value::as_str) {
        out.push(KeyValue::new(sc::DB_SYSTEM_NAME, system.to_string()));
    }
    if let Some(code) = a.get("db.error.code") {
        let code = code
            .as_str()
            .map(str::to_string)
            .unwrap_or(code.to_string());
        out.push(KeyValue::new(sc::DB_RESPONSE_STATUS_CODE, code.clone()));
        out.push(KeyValue::new(sc::ERROR_TYPE, code));
    }
    if !a.contains_key("db.name") {
        if let Some(index) = a.get("db.redis.database_index") {
            out.push(KeyValue::new(sc::DB_NAMESPACE, index.to_string()));
        }
    }
    // HTTP failures name their status code as the error type (the HTTP conventions).
    if span.status.code == StatusCode::Error {
        if let Some(code) = a.get("http.status_code").and_then(Value::as_i64) {
            out.push(KeyValue::new(sc::ERROR_TYPE, code.to_string()));
        }
    }
    if let Some(id) = &span.activity_id {
        out.push(KeyValue::new("temporal.activity.id", id.clone()));
    }
    for (prefix, headers) in [
        (sc::HTTP_REQUEST_HEADER, &span.request_headers),
        (sc::HTTP_RESPONSE_HEADER, &span.response_headers),
    ] {
        for (name, v) in headers.iter().flatten() {
            if let Some(v) = v.as_str() {
                let values = vec![StringValue::from(v.to_string())];
                out.push(KeyValue::new(
                    format!("{prefix}.{name}"),
                    OtelValue::Array(Array::String(values)),
                ));
            }
        }
    }
    if let Some(b) = &span.request_body {
        out.push(KeyValue::new("openbox.http.request.body", b.clone()));
    }
    if let Some(b) = &span.response_body {
        out.push(KeyValue::new("openbox.http.response.body", b.clone()));
    }
    out
}

/// A JSON attribute value as an OpenTelemetry one: scalars as they are, arrays of one
/// scalar type as arrays, anything else as its JSON text.
fn value(v: &Value) -> Option<OtelValue> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => OtelValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => OtelValue::I64(i),
            None => OtelValue::F64(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => OtelValue::String(s.clone().into()),
        Value::Array(items) if items.iter().all(Value::is_string) => {
            OtelValue::Array(Array::String(
                items
                    .iter()
                    .filter_map(|i| i.as_str().map(|s| StringValue::from(s.to_string())))
                    .collect(),
            ))
        }
        Value::Array(items) if items.iter().all(|i| i.as_i64().is_some()) => {
            OtelValue::Array(Array::I64(items.iter().filter_map(Value::as_i64).collect()))
        }
        other => OtelValue::String(other.to_string().into()),
    })
}

/// Span events in the SDK's JSON (`{"name", "timestamp", "attributes"}`).
fn events(events: &[Value]) -> SpanEvents {
    let mut out = SpanEvents::default();
    for e in events {
        let Some(name) = e.get("name").and_then(Value::as_str) else {
            continue;
        };
        let ts = e.get("timestamp").and_then(Value::as_u64).unwrap_or(0);
        let attributes = e
            .get("attributes")
            .and_then(Value::as_object)
            .map(json_attributes)
            .unwrap_or_default();
        out.events.push(opentelemetry::trace::Event::new(
            name.to_string(),
            epoch(ts),
            attributes,
            0,
        ));
    }
    out
}

/// JSON attributes as they are (no renaming): activity and workflow span attributes.
pub fn json_attributes(m: &Map<String, Value>) -> Vec<KeyValue> {
    m.iter()
        .filter_map(|(k, v)| Some(KeyValue::new(k.clone(), value(v)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{conn::Attribution, span::Status as SpanStatus};

    fn captured(name: &str, kind: &'static str, attributes: Value) -> Span {
        Span {
            span_id: "00f067aa0ba902b7".into(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            parent_span_id: None,
            name: name.into(),
            kind,
            start_time: 1_000,
            end_time: 2_000,
            duration_ns: Some(1_000),
            attributes: attributes.as_object().unwrap().clone(),
            status: SpanStatus {
                code: StatusCode::Unset,
                description: None,
            },
            events: Vec::new(),
            activity_id: Some("7".into()),
            request_body: Some("{}".into()),
            response_body: None,
            request_headers: Some(
                json!({"content-type": "application/json"})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
            response_headers: None,
            pid: 42,
            tid: 43,
            attr: Attribution::default(),
        }
    }

    fn get<'a>(kvs: &'a [KeyValue], key: &str) -> Option<&'a OtelValue> {
        kvs.iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    #[test]
    fn http_attributes_take_the_stable_names() {
        let s = captured(
            "POST",
            "CLIENT",
            json!({"http.method": "POST", "http.url": "https://api.local:8443/v1/chat?x=1",
                "http.target": "/v1/chat?x=1", "http.host": "api.local:8443",
                "http.scheme": "https", "http.status_code": 200,
                "net.peer.name": "api.local", "net.peer.port": 8443, "net.transport": "ip_tcp",
                "gen_ai.request.model": "m1", "container.id": "abc"}),
        );
        let at = Placement {
            trace_id: s.trace_id.clone(),
            parent: Some("1111111111111111".into()),
        };
        let d = span_data(&s, &at);
        let a = &d.attributes;
        assert_eq!(get(a, "http.request.method"), Some(&"POST".into()));
        assert_eq!(
            get(a, "url.full"),
            Some(&"https://api.local:8443/v1/chat?x=1".into())
        );
        assert_eq!(get(a, "url.path"), Some(&"/v1/chat".into()));
        assert_eq!(get(a, "url.query"), Some(&"x=1".into()));
        assert_eq!(get(a, "http.response.status_code"), Some(&200.into()));
        assert_eq!(get(a, "server.address"), Some(&"api.local".into()));
        assert_eq!(get(a, "server.port"), Some(&8443.into()));
        assert_eq!(get(a, "network.transport"), Some(&"tcp".into()));
        assert_eq!(get(a, "gen_ai.request.model"), Some(&"m1".into()));
        assert_eq!(get(a, "temporal.activity.id"), Some(&"7".into()));
        assert_eq!(get(a, "openbox.http.request.body"), Some(&"{}".into()));
        assert!(get(a, "http.request.header.content-type").is_some());
        for old in [
            "http.method",
            "http.url",
            "http.status_code",
            "net.peer.name",
            "http.host",
            "container.id",
        ] {
            assert!(get(a, old).is_none(), "{old} stays out of the OTLP span");
        }
        assert_eq!(
            d.parent_span_id,
            SpanId::from_hex("1111111111111111").unwrap()
        );
        assert_eq!(
            d.span_context.span_id(),
            SpanId::from_hex(&s.span_id).unwrap()
        );
        assert_eq!(
            d.span_context.trace_id(),
            TraceId::from_hex(&s.trace_id).unwrap()
        );
        assert_eq!(d.span_kind, SpanKind::Client);
        let r = resource_of(&s);
        assert!(r.0.contains(&KeyValue::new("container.id", "abc")));
        assert!(r.0.contains(&KeyValue::new("process.pid", 42i64)));
    }

    #[test]
    fn database_attributes_take_the_stable_names() {
        let s = captured(
            "SELECT",
            "CLIENT",
            json!({"db.system": "postgresql", "db.statement": "SELECT 1", "db.name": "app",
                "db.operation": "SELECT", "db.rowcount": 1, "db.user": "u",
                "net.peer.name": "127.0.0.1", "net.peer.port": 5432}),
        );
        let at = Placement {
            trace_id: s.trace_id.clone(),
            parent: None,
        };
        let a = span_data(&s, &at).attributes;
        assert_eq!(get(&a, "db.system.name"), Some(&"postgresql".into()));
        assert_eq!(get(&a, "db.query.text"), Some(&"SELECT 1".into()));
        assert_eq!(get(&a, "db.namespace"), Some(&"app".into()));
        assert_eq!(get(&a, "db.operation.name"), Some(&"SELECT".into()));
        assert_eq!(get(&a, "db.response.returned_rows"), Some(&1.into()));
        assert_eq!(get(&a, "server.port"), Some(&5432.into()));
        // No stable counterpart: passed through.
        assert_eq!(get(&a, "db.user"), Some(&"u".into()));
        assert!(get(&a, "db.statement").is_none() && get(&a, "db.system").is_none());
    }

    #[test]
    fn a_span_with_its_own_parent_keeps_it() {
        let mut s = captured("file.write", "INTERNAL", json!({"file.path": "/tmp/x"}));
        s.parent_span_id = Some("2222222222222222".into());
        let at = Placement {
            trace_id: s.trace_id.clone(),
            parent: Some("1111111111111111".into()),
        };
        let d = span_data(&s, &at);
        assert_eq!(
            d.parent_span_id,
            SpanId::from_hex("2222222222222222").unwrap()
        );
        assert_eq!(get(&d.attributes, "file.path"), Some(&"/tmp/x".into()));
    }
}
