//! Where spans hang: a trace per workflow run with the run's span at its root, a span
//! per activity attempt under it, and the activity's captured operations under that.
//!
//! The ids of a run are derived from the run itself, not remembered: the workflow's
//! span and the activity spans under it may be made by agents on different nodes (the
//! workflow task on one worker, the activity on another), and all of them must agree.
//! A run id is a UUID, 128 random bits: it is the trace id (so a run is found in the
//! backend by its run id); anything else is hashed.
//!
//! When the worker already traces (Temporal's OpenTelemetry `TracingInterceptor`), the
//! hook sends the W3C `traceparent` current at activity start: the activity's span then
//! joins the user's trace under the user's activity span, with a link to the run's span.

use std::{borrow::Cow, time::SystemTime};

use opentelemetry::{
    trace::{Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
    KeyValue,
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use super::otlp::scope;
use crate::governance::{
    events::{ActivityError, ActivityInfo, ActivityStatus, WorkflowInfo},
    verdict::Decision,
};

/// The trace of a workflow run: its run id when that is a UUID, else a hash of the
/// workflow id and run id.
pub fn run_trace_id(workflow_id: &str, run_id: &str) -> String {
    let hex: String = run_id.chars().filter(|c| *c != '-').collect();
    if hex.len() == 32
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && hex.bytes().any(|b| b != b'0')
    {
        return hex.to_ascii_lowercase();
    }
    format!(
        "{:016x}{:016x}",
        fnv1a(&[b"trace-hi", workflow_id.as_bytes(), run_id.as_bytes()]),
        fnv1a(&[b"trace-lo", workflow_id.as_bytes(), run_id.as_bytes()])
    )
}

/// The span id of a run's workflow span.
pub fn workflow_span_id(workflow_id: &str, run_id: &str) -> String {
    format!(
        "{:016x}",
        fnv1a(&[b"workflow", workflow_id.as_bytes(), run_id.as_bytes()])
    )
}

/// FNV-1a (64-bit) over the parts, each followed by a 0 byte; never 0 (an invalid id).
/// A stable function, unlike std's hasher, so agents of different builds agree.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain([&0u8]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h.max(1)
}

/// A W3C trace context the worker sent (`traceparent` and `tracestate` headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub trace_id: String,
    pub span_id: String,
    pub sampled: bool,
    pub tracestate: Option<String>,
}

/// Reads a `traceparent` (W3C Trace Context §3.2: `00-<32 hex>-<16 hex>-<2 hex>`);
/// `None` for anything malformed or all-zero ids, which the spec says to ignore.
pub fn parse_traceparent(traceparent: &str, tracestate: Option<&str>) -> Option<Remote> {
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    let [version, trace, span, flags, ..] = parts[..] else {
        return None;
    };
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    // Version ff is invalid; a future version may add fields after these four.
    if !hex(version, 2) || version == "ff" || (version == "00" && parts.len() != 4) {
        return None;
    }
    if !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || span.bytes().all(|b| b == b'0') {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(Remote {
        trace_id: trace.to_string(),
        span_id: span.to_string(),
        sampled: flags & 1 == 1,
        tracestate: tracestate
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string),
    })
}

/// Where an activity attempt's span goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityPlace {
    pub trace_id: String,
    pub span_id: String,
    /// The run's workflow span, or the user's activity span when the worker traces.
    pub parent_span_id: String,
    /// The parent is the user's (from the worker's trace context).
    pub remote_parent: Option<Remote>,
}

impl ActivityPlace {
    pub fn new(info: &ActivityInfo, span_id: String, remote: Option<Remote>) -> ActivityPlace {
        match remote {
            Some(r) => ActivityPlace {
                trace_id: r.trace_id.clone(),
                span_id,
                parent_span_id: r.span_id.clone(),
                remote_parent: Some(r),
            },
            None => ActivityPlace {
                trace_id: run_trace_id(&info.workflow_id, &info.run_id),
                span_id,
                parent_span_id: workflow_span_id(&info.workflow_id, &info.run_id),
                remote_parent: None,
            },
        }
    }
}

/// How governance answered, as span attributes under `openbox.governance.<stage>.*`:
/// `action` (continue, fail, approval_pending), `verdict`, `reason`.
pub fn decision_attributes(stage: &str, d: &Decision) -> Vec<KeyValue> {
    let p = |k: &str| format!("openbox.governance.{stage}.{k}");
    match d {
        Decision::Continue { verdict, .. } => {
            let mut v = vec![KeyValue::new(p("action"), "continue")];
            if let Some(verdict) = verdict {
                v.push(KeyValue::new(p("verdict"), verdict.as_str()));
            }
            v
        }
        Decision::Fail {
            error_type,
            message,
            ..
        } => vec![
            KeyValue::new(p("action"), "fail"),
            KeyValue::new(p("verdict"), error_type.as_str()),
            KeyValue::new(p("reason"), message.clone()),
        ],
        Decision::ApprovalPending { message } => vec![
            KeyValue::new(p("action"), "approval_pending"),
            KeyValue::new(p("reason"), message.clone()),
        ],
    }
}

/// What an activity attempt's span says.
pub struct ActivityEnd<'a> {
    pub info: &'a ActivityInfo,
    pub place: &'a ActivityPlace,
    pub start: SystemTime,
    pub end: SystemTime,
    pub status: ActivityStatus,
    pub error: Option<&'a ActivityError>,
    /// Governance attributes ([`decision_attributes`]) of the start and the end.
    pub governance: Vec<KeyValue>,
}

pub fn activity_span(a: ActivityEnd<'_>) -> SpanData {
    let info = a.info;
    let mut attributes = vec![
        KeyValue::new("temporal.workflow.id", info.workflow_id.clone()),
        KeyValue::new("temporal.workflow.run_id", info.run_id.clone()),
        KeyValue::new("temporal.workflow.type", info.workflow_type.clone()),
        KeyValue::new("temporal.activity.id", info.activity_id.clone()),
        KeyValue::new("temporal.activity.type", info.activity_type.clone()),
        KeyValue::new("temporal.task_queue", info.task_queue.clone()),
        KeyValue::new("temporal.activity.attempt", i64::from(info.attempt)),
        KeyValue::new(
            "openbox.activity.status",
            match a.status {
                ActivityStatus::Completed => "completed",
                ActivityStatus::Failed => "failed",
            },
        ),
    ];
    let status = match (a.status, a.error) {
        (ActivityStatus::Failed, Some(e)) => {
            attributes.push(KeyValue::new("error.type", e.kind.clone()));
            Status::error(e.message.clone())
        }
        (ActivityStatus::Failed, None) => Status::error(""),
        _ => Status::Unset,
    };
    attributes.extend(a.governance);
    let place = a.place;
    let mut links = SpanLinks::default();
    // Joined to the user's trace: the run's own span stays reachable.
    if place.remote_parent.is_some() {
        links.links.push(Link::new(
            context(
                &run_trace_id(&info.workflow_id, &info.run_id),
                &workflow_span_id(&info.workflow_id, &info.run_id),
                false,
                None,
            ),
            vec![KeyValue::new("openbox.link", "workflow_run")],
            0,
        ));
    }
    let tracestate = place
        .remote_parent
        .as_ref()
        .and_then(|r| r.tracestate.as_deref());
    SpanData {
        parent_span_id: SpanId::from_hex(&place.parent_span_id).unwrap_or(SpanId::INVALID),
        parent_span_is_remote: place.remote_parent.is_some(),
        links,
        ..internal_span(
            context(&place.trace_id, &place.span_id, false, tracestate),
            format!("activity {}", info.activity_type),
            (a.start, a.end),
            attributes,
            status,
        )
    }
}

/// How a run ended, for its span.
pub enum RunEnd<'a> {
    Completed,
    /// Continued as new: the next run's span links to this one.
    ContinuedAsNew,
    Failed {
        error: &'a serde_json::Value,
    },
}

/// The span of a workflow run, from WorkflowStarted to WorkflowCompleted/Failed.
/// `previous_run`: the run it continues (continue-as-new, retry, cron), linked.
pub fn workflow_span(
    wf: &WorkflowInfo,
    task_queue: &str,
    start: SystemTime,
    end: SystemTime,
    how: RunEnd<'_>,
    previous_run: Option<&str>,
) -> SpanData {
    let mut attributes = vec![
        KeyValue::new("temporal.workflow.id", wf.workflow_id.clone()),
        KeyValue::new("temporal.workflow.run_id", wf.run_id.clone()),
        KeyValue::new("temporal.workflow.type", wf.workflow_type.clone()),
    ];
    if !task_queue.is_empty() {
        attributes.push(KeyValue::new("temporal.task_queue", task_queue.to_string()));
    }
    let status = match how {
        RunEnd::Completed => {
            attributes.push(KeyValue::new("openbox.workflow.status", "completed"));
            Status::Unset
        }
        RunEnd::ContinuedAsNew => {
            attributes.push(KeyValue::new("openbox.workflow.status", "continued_as_new"));
            Status::Unset
        }
        RunEnd::Failed { error } => {
            attributes.push(KeyValue::new("openbox.workflow.status", "failed"));
            let kind = error
                .get("type")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("WorkflowFailed");
            attributes.push(KeyValue::new("error.type", kind.to_string()));
            let message = error
                .get("message")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default();
            Status::error(message.to_string())
        }
    };
    let mut links = SpanLinks::default();
    if let Some(prev) = previous_run.filter(|p| !p.is_empty()) {
        attributes.push(KeyValue::new(
            "temporal.workflow.continued_run_id",
            prev.to_string(),
        ));
        links.links.push(Link::new(
            context(
                &run_trace_id(&wf.workflow_id, prev),
                &workflow_span_id(&wf.workflow_id, prev),
                false,
                None,
            ),
            vec![KeyValue::new("openbox.link", "previous_run")],
            0,
        ));
    }
    let span_context = context(
        &run_trace_id(&wf.workflow_id, &wf.run_id),
        &workflow_span_id(&wf.workflow_id, &wf.run_id),
        false,
        None,
    );
    let name = format!("workflow {}", wf.workflow_type);
    SpanData {
        links,
        ..internal_span(span_context, name, (start, end), attributes, status)
    }
}

/// The root span of a traced command (`trace`): the captured spans hang under it.
pub fn command_span(
    trace_id: &str,
    span_id: &str,
    command: &str,
    pid: u32,
    start: SystemTime,
    end: SystemTime,
    exit_code: Option<i32>,
) -> SpanData {
    let mut attributes = vec![
        KeyValue::new("process.command_line", command.to_string()),
        KeyValue::new("process.pid", i64::from(pid)),
    ];
    if let Some(code) = exit_code {
        attributes.push(KeyValue::new("process.exit.code", i64::from(code)));
    }
    let status = match exit_code {
        Some(c) if c != 0 => Status::error(format!("exited with status {c}")),
        _ => Status::Unset,
    };
    let name = format!(
        "trace {}",
        command.split_whitespace().next().unwrap_or(command)
    );
    internal_span(
        context(trace_id, span_id, false, None),
        name,
        (start, end),
        attributes,
        status,
    )
}

/// A span of ours (workflow run, activity, traced command): internal, a root until the
/// caller says otherwise, ending no earlier than it starts.
fn internal_span(
    span_context: SpanContext,
    name: String,
    (start, end): (SystemTime, SystemTime),
    attributes: Vec<KeyValue>,
    status: Status,
) -> SpanData {
    SpanData {
        span_context,
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: SpanKind::Internal,
        name: Cow::Owned(name),
        start_time: start,
        end_time: end.max(start),
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope(),
    }
}

fn context(trace_id: &str, span_id: &str, remote: bool, tracestate: Option<&str>) -> SpanContext {
    let state = tracestate
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    SpanContext::new(
        TraceId::from_hex(trace_id).unwrap_or(TraceId::INVALID),
        SpanId::from_hex(span_id).unwrap_or(SpanId::INVALID),
        TraceFlags::SAMPLED,
        remote,
        state,
    )
}

/// A trace id for spans outside any activity: each unattributed span is a root of its
/// own trace (a file.open's children share their parent's).
pub fn unattributed_trace_id(session_trace: &str, root_span_id: &str) -> String {
    format!(
        "{:016x}{:016x}",
        fnv1a(&[
            b"unattributed-hi",
            session_trace.as_bytes(),
            root_span_id.as_bytes()
        ]),
        fnv1a(&[
            b"unattributed-lo",
            session_trace.as_bytes(),
            root_span_id.as_bytes()
        ])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_trace_is_its_run_id_and_its_ids_are_the_same_everywhere() {
        let run = "0f8fad5b-d9cb-469f-a165-70867728950e";
        assert_eq!(run_trace_id("wf", run), "0f8fad5bd9cb469fa16570867728950e");
        assert_eq!(workflow_span_id("wf", run), workflow_span_id("wf", run));
        assert_ne!(workflow_span_id("wf", run), workflow_span_id("wf2", run));
        let t = run_trace_id("wf", "not-a-uuid");
        assert_eq!(t.len(), 32);
        assert_eq!(t, run_trace_id("wf", "not-a-uuid"));
        assert_ne!(t, run_trace_id("wf", "not-a-uuid2"));
    }

    #[test]
    fn traceparent_is_read_as_w3c_trace_context_says() {
        let r = parse_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("vendor=x"),
        )
        .unwrap();
        assert_eq!(r.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(r.span_id, "00f067aa0ba902b7");
        assert!(r.sampled);
        assert_eq!(r.tracestate.as_deref(), Some("vendor=x"));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
            "",
        ] {
            assert!(parse_traceparent(bad, None).is_none(), "{bad}");
        }
        // A later version may append fields.
        assert!(parse_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            None
        )
        .is_some());
    }

    #[test]
    fn an_activity_hangs_under_its_run_or_under_the_users_span() {
        let info = ActivityInfo {
            workflow_id: "wf".into(),
            run_id: "0f8fad5b-d9cb-469f-a165-70867728950e".into(),
            activity_type: "fetch".into(),
            attempt: 2,
            ..Default::default()
        };
        let own = ActivityPlace::new(&info, "1111111111111111".into(), None);
        assert_eq!(own.trace_id, "0f8fad5bd9cb469fa16570867728950e");
        assert_eq!(
            own.parent_span_id,
            workflow_span_id(&info.workflow_id, &info.run_id)
        );
        let user = parse_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        );
        let joined = ActivityPlace::new(&info, "1111111111111111".into(), user);
        assert_eq!(joined.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(joined.parent_span_id, "00f067aa0ba902b7");
        let now = SystemTime::now();
        let d = activity_span(ActivityEnd {
            info: &info,
            place: &joined,
            start: now,
            end: now,
            status: ActivityStatus::Failed,
            error: Some(&ActivityError {
                kind: "ValueError".into(),
                message: "bad".into(),
            }),
            governance: decision_attributes("completed", &Decision::allow_without_verdict()),
        });
        assert!(d.parent_span_is_remote);
        assert_eq!(d.links.links.len(), 1, "linked to the run's own span");
        assert_eq!(d.status, Status::error("bad"));
        assert!(d
            .attributes
            .contains(&KeyValue::new("temporal.activity.attempt", 2i64)));
        assert!(d.attributes.contains(&KeyValue::new(
            "openbox.governance.completed.action",
            "continue"
        )));
    }

    #[test]
    fn a_continued_run_links_to_the_run_it_continues() {
        let wf = WorkflowInfo {
            workflow_id: "wf".into(),
            run_id: "0f8fad5b-d9cb-469f-a165-70867728950e".into(),
            workflow_type: "Agent".into(),
            task_queue: String::new(),
        };
        let prev = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
        let now = SystemTime::now();
        let d = workflow_span(&wf, "q", now, now, RunEnd::Completed, Some(prev));
        let link = &d.links.links[0];
        assert_eq!(
            link.span_context.trace_id(),
            TraceId::from_hex("7c9e6679742540de944be07fc1f90ae7").unwrap()
        );
        assert_eq!(
            link.span_context.span_id(),
            SpanId::from_hex(&workflow_span_id("wf", prev)).unwrap()
        );
        assert_eq!(d.parent_span_id, SpanId::INVALID);
    }
}
