//! Attribution: which activity each captured span must belong to (by its marker) against
//! what the agent reported.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::AgentReport;

/// What a marker span is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// An HTTP span whose `http.url` holds the marker.
    Https,
    /// A PostgreSQL span whose `db.statement` holds the marker.
    Sql,
    /// A `file.open` span whose `file.path` holds the marker.
    FileOpen,
}

/// An activity attempt the test ran, and what the agent must have reported for it.
#[derive(Clone, Debug)]
pub struct ExpectedActivity {
    pub workflow_id: String,
    pub activity_id: String,
    pub attempt: u64,
    /// `completed` or `failed`.
    pub status: &'static str,
    /// The marker its spans carry (the activity id, plus `-attempt-N` for retries).
    pub marker: String,
    /// Spans it must have.
    pub kinds: Vec<Kind>,
}

impl ExpectedActivity {
    pub fn new(workflow_id: &str, marker: &str, kinds: &[Kind]) -> ExpectedActivity {
        ExpectedActivity {
            workflow_id: workflow_id.to_string(),
            activity_id: marker.to_string(),
            attempt: 1,
            status: "completed",
            marker: marker.to_string(),
            kinds: kinds.to_vec(),
        }
    }
}

/// Every marker (`<token>` followed by `[a-z0-9-]*`) in `text`.
pub fn markers_in_text(text: &str, token: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(token) {
        let after = &rest[i + token.len()..];
        let len = after
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
            .unwrap_or(after.len());
        out.push(format!("{token}{}", &after[..len]));
        rest = &after[len..];
    }
    out
}

fn attr<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    span.get("attributes")?.get(key)?.as_str()
}

/// The markers a span carries in `http.url`, `db.statement` or `file.path`.
pub fn span_markers(span: &Value, token: &str) -> BTreeSet<String> {
    ["http.url", "db.statement", "file.path"]
        .iter()
        .filter_map(|k| attr(span, k))
        .flat_map(|t| markers_in_text(t, token))
        .collect()
}

/// The kinds of marker span this span is, for `marker` (a marker of `token`).
pub fn span_kinds(span: &Value, token: &str, marker: &str) -> Vec<Kind> {
    let mut kinds = Vec::new();
    let has = |key: &str| {
        attr(span, key).is_some_and(|t| markers_in_text(t, token).iter().any(|m| m == marker))
    };
    if has("http.url") {
        kinds.push(Kind::Https);
    }
    if has("db.statement") {
        kinds.push(Kind::Sql);
    }
    if has("file.path") && span.get("name").and_then(Value::as_str) == Some("file.open") {
        kinds.push(Kind::FileOpen);
    }
    kinds
}

fn show_span(span: &Value) -> String {
    format!(
        "{} {} {}",
        span.get("name").and_then(Value::as_str).unwrap_or("?"),
        span.get("span_id").and_then(Value::as_str).unwrap_or("?"),
        span.get("attributes").cloned().unwrap_or(Value::Null)
    )
}

/// How the agent's report compares with the activities the test ran.
#[derive(Debug, Default)]
pub struct Attribution {
    /// Marker spans on an activity other than the marker's (the defect this suite is for).
    pub misattributed: Vec<String>,
    /// (marker, kind) an activity ran but the agent did not put on it.
    pub missing: Vec<(String, Kind)>,
    /// Anything else wrong with the events: a missing ActivityStarted or
    /// ActivityCompleted, a wrong status, a span whose own `activity_id` differs from
    /// its event's, a `span_count` that is not the number of spans.
    pub problems: Vec<String>,
    /// Marker spans in the unattributed file, by reason: the markers.
    pub unattributed: BTreeMap<String, Vec<String>>,
    /// Marker spans on the right activity.
    pub attributed: usize,
}

fn key_of(e: &Value) -> (String, String, u64) {
    (
        e.get("workflow_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        e.get("activity_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        e.get("attempt").and_then(Value::as_u64).unwrap_or(0),
    )
}

/// What is wrong with one ActivityStarted/ActivityCompleted of `exp` against the SDK 1.0
/// format (openbox-core-protocol.md §2.2): field presence and types, the worker's
/// `Fanout` workflow type, the activity's input, and, for ActivityCompleted, status,
/// error and output consistency and every span inside the activity's time window.
pub fn event_shape_problems(e: &Value, exp: &ExpectedActivity) -> Vec<String> {
    let mut p = Vec::new();
    let kind = e.get("event_type").and_then(Value::as_str).unwrap_or("?");
    let nonempty_str = |k: &str| {
        e.get(k)
            .and_then(Value::as_str)
            .is_some_and(|v| !v.is_empty())
    };
    if e.get("source").and_then(Value::as_str) != Some("workflow-telemetry") {
        p.push(format!("{kind}: source is not \"workflow-telemetry\""));
    }
    for k in ["run_id", "activity_type", "task_queue", "timestamp"] {
        if !nonempty_str(k) {
            p.push(format!("{kind}: {k} missing or not a non-empty string"));
        }
    }
    if e.get("workflow_type").and_then(Value::as_str) != Some("Fanout") {
        p.push(format!(
            "{kind}: workflow_type is {}, expected \"Fanout\"",
            e.get("workflow_type").cloned().unwrap_or(Value::Null)
        ));
    }
    if !e
        .get("timestamp")
        .and_then(Value::as_str)
        .is_some_and(|t| t.ends_with('Z') && t.contains('T'))
    {
        p.push(format!("{kind}: timestamp is not RFC 3339 UTC with Z"));
    }
    // worker.py passes one dict holding the marker: activity_input = [that dict].
    let input_marker = e
        .get("activity_input")
        .and_then(|i| i.get(0))
        .and_then(|d| d.get("marker"))
        .and_then(Value::as_str);
    if input_marker != Some(exp.activity_id.as_str()) {
        p.push(format!(
            "{kind}: activity_input is not [{{\"marker\": {:?}, …}}]: {}",
            exp.activity_id,
            e.get("activity_input").cloned().unwrap_or(Value::Null)
        ));
    }
    if kind != "ActivityCompleted" {
        return p;
    }
    let start = e.get("start_time").and_then(Value::as_f64);
    let end = e.get("end_time").and_then(Value::as_f64);
    match (start, end) {
        (Some(s), Some(t)) if s <= t => {
            // Spans are in Unix ns; the activity's window in float Unix seconds. The
            // kernel clock is converted to wall-clock time: allow 2 s of skew.
            let (lo, hi) = ((s - 2.0) * 1e9, (t + 2.0) * 1e9);
            for span in e
                .get("spans")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let (a, b) = (
                    span.get("start_time").and_then(Value::as_f64),
                    span.get("end_time").and_then(Value::as_f64),
                );
                if !matches!((a, b), (Some(a), Some(b)) if a >= lo && b <= hi) {
                    p.push(format!(
                        "span outside the activity's time window [{s}, {t}] s: {}",
                        show_span(span)
                    ));
                }
            }
        }
        _ => p.push(format!(
            "start_time/end_time missing or start after end: {start:?} {end:?}"
        )),
    }
    if e.get("duration_ms").and_then(Value::as_f64).is_none() {
        p.push("duration_ms missing or not a number".into());
    }
    if e.get("span_count").and_then(Value::as_u64).is_none()
        || !e.get("spans").is_some_and(Value::is_array)
    {
        p.push("span_count or spans missing".into());
    }
    match e.get("status").and_then(Value::as_str) {
        Some("completed") => {
            if !e.get("error").is_some_and(Value::is_null) {
                p.push(format!(
                    "completed but error is {}",
                    e.get("error").cloned().unwrap_or(Value::Null)
                ));
            }
            if e.get("activity_output").is_none_or(Value::is_null) {
                p.push("completed but activity_output is null or missing".into());
            }
        }
        Some("failed") => {
            let err = e.get("error");
            if !err.is_some_and(|x| {
                x.get("type").is_some_and(Value::is_string)
                    && x.get("message").is_some_and(Value::is_string)
            }) {
                p.push(format!(
                    "failed but error is not {{type, message}}: {}",
                    err.cloned().unwrap_or(Value::Null)
                ));
            }
            if !e.get("activity_output").is_some_and(Value::is_null) {
                p.push("failed but activity_output is not null".into());
            }
        }
        other => p.push(format!("status is {other:?}")),
    }
    p
}

/// Compares the agent's events and unattributed spans with `expected`. Every marker
/// span (one whose URL, statement or path holds a marker of `token`) found on any
/// ActivityCompleted must be on the activity attempt whose marker it carries.
pub fn check_attribution(
    report: &AgentReport,
    token: &str,
    expected: &[ExpectedActivity],
) -> Attribution {
    let mut out = Attribution::default();
    let by_marker: BTreeMap<&str, &ExpectedActivity> =
        expected.iter().map(|e| (e.marker.as_str(), e)).collect();
    let completed = report.events_of("ActivityCompleted");
    let started: BTreeSet<(String, String, u64)> = report
        .events_of("ActivityStarted")
        .into_iter()
        .map(key_of)
        .collect();
    let mut by_key: BTreeMap<(String, String, u64), Vec<&Value>> = BTreeMap::new();
    for e in &completed {
        by_key.entry(key_of(e)).or_default().push(e);
    }

    for exp in expected {
        let key = (
            exp.workflow_id.clone(),
            exp.activity_id.clone(),
            exp.attempt,
        );
        let who = format!(
            "{} / {} attempt {}",
            exp.workflow_id, exp.activity_id, exp.attempt
        );
        if !started.contains(&key) {
            out.problems.push(format!("no ActivityStarted for {who}"));
        }
        let events = by_key.get(&key).cloned().unwrap_or_default();
        match events.len() {
            0 => {
                out.problems.push(format!("no ActivityCompleted for {who}"));
                for k in &exp.kinds {
                    out.missing.push((exp.marker.clone(), *k));
                }
                continue;
            }
            1 => {}
            n => out
                .problems
                .push(format!("{n} ActivityCompleted events for {who}")),
        }
        let event = events[0];
        for e in events.iter().copied().chain(
            report
                .events_of("ActivityStarted")
                .into_iter()
                .filter(|e| key_of(e) == key),
        ) {
            out.problems.extend(
                event_shape_problems(e, exp)
                    .into_iter()
                    .map(|p| format!("{who}: {p}")),
            );
        }
        let status = event.get("status").and_then(Value::as_str).unwrap_or("");
        if status != exp.status {
            out.problems.push(format!(
                "ActivityCompleted for {who} has status {status:?}, expected {:?} (error: {})",
                exp.status,
                event.get("error").cloned().unwrap_or(Value::Null)
            ));
        }
        let spans: Vec<&Value> = event
            .get("spans")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .collect();
        let have: BTreeSet<Kind> = spans
            .iter()
            .flat_map(|s| span_kinds(s, token, &exp.marker))
            .collect();
        for k in &exp.kinds {
            if !have.contains(k) {
                out.missing.push((exp.marker.clone(), *k));
            }
        }
    }

    for e in &completed {
        let (wf, aid, attempt) = key_of(e);
        let spans: Vec<&Value> = e
            .get("spans")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .collect();
        if let Some(n) = e.get("span_count").and_then(Value::as_u64) {
            if n != spans.len() as u64 {
                out.problems.push(format!(
                    "ActivityCompleted {wf} / {aid} attempt {attempt}: span_count {n} but {} spans",
                    spans.len()
                ));
            }
        }
        let owner = expected
            .iter()
            .find(|x| x.workflow_id == wf && x.activity_id == aid && x.attempt == attempt);
        for span in spans {
            if let Some(span_aid) = span.get("activity_id").and_then(Value::as_str) {
                if span_aid != aid {
                    out.problems.push(format!(
                        "span on ActivityCompleted {wf} / {aid} says activity_id {span_aid:?}: {}",
                        show_span(span)
                    ));
                }
            }
            for m in span_markers(span, token) {
                match (owner, by_marker.get(m.as_str())) {
                    (Some(o), Some(_)) if o.marker == m => out.attributed += 1,
                    (_, Some(right)) => out.misattributed.push(format!(
                        "span of {} (attempt {}) on {wf} / {aid} attempt {attempt}: {}",
                        right.activity_id,
                        right.attempt,
                        show_span(span)
                    )),
                    (_, None) => out.misattributed.push(format!(
                        "span with marker {m}, which no activity of the test used, on {wf} / {aid} attempt {attempt}: {}",
                        show_span(span)
                    )),
                }
            }
        }
    }

    for u in &report.unattributed {
        let reason = u
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("(no reason)")
            .to_string();
        let Some(span) = u.get("span") else { continue };
        for m in span_markers(span, token) {
            out.unattributed
                .entry(reason.clone())
                .or_default()
                .push(format!(
                    "{m}: {}",
                    span.get("name").and_then(Value::as_str).unwrap_or("?")
                ));
        }
    }
    out
}

impl Attribution {
    /// Prints the comparison (always, so a passing run shows its gaps too).
    pub fn print(&self, what: &str, report: &AgentReport) {
        println!("== {what}: attribution");
        println!("  marker spans on the right activity: {}", self.attributed);
        println!("  misattributed: {}", self.misattributed.len());
        for m in self.misattributed.iter().take(20) {
            println!("    {m}");
        }
        println!("  missing (activity, kind): {}", self.missing.len());
        for (m, k) in self.missing.iter().take(30) {
            println!("    {m} {k:?}");
        }
        let n: usize = self.unattributed.values().map(Vec::len).sum();
        println!("  marker spans reported unattributed: {n}");
        for (reason, ms) in &self.unattributed {
            println!(
                "    {reason}: {} ({})",
                ms.len(),
                ms.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
            );
        }
        println!("  other problems: {}", self.problems.len());
        for p in self.problems.iter().take(20) {
            println!("    {p}");
        }
        println!("  agent summary: {}", report.summary);
        println!(
            "  files: {} {} {}",
            report.events_path.display(),
            report.unattributed_path.display(),
            report.stderr_path.display()
        );
    }

    /// Zero misattributed marker spans, at most `allowed_missing` missing ones, no other
    /// problem.
    #[track_caller]
    pub fn assert_exact(&self, allowed_missing: usize, report: &AgentReport) {
        assert!(
            self.misattributed.is_empty(),
            "{} marker span(s) attributed to the WRONG activity (see the output above and {}):\n{}",
            self.misattributed.len(),
            report.events_path.display(),
            self.misattributed
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            self.problems.is_empty(),
            "the agent's events are wrong (see {}):\n{}",
            report.events_path.display(),
            self.problems
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            self.missing.len() <= allowed_missing,
            "{} expected span(s) missing from their activity (allowed {allowed_missing}); unattributed by reason: {:?} (see {} and {}):\n{}",
            self.missing.len(),
            self.unattributed.iter().map(|(r, m)| (r.clone(), m.len())).collect::<BTreeMap<_, _>>(),
            report.events_path.display(),
            report.unattributed_path.display(),
            self.missing.iter().take(30).map(|(m, k)| format!("{m} {k:?}")).collect::<Vec<_>>().join("\n")
        );
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::process::ExitStatusExt, path::PathBuf, process::ExitStatus};

    use serde_json::json;

    use super::*;

    const T: &str = "mk0123abcd";

    fn span(name: &str, attrs: Value, aid: &str) -> Value {
        json!({"name": name, "span_id": "00000000000000aa", "start_time": 1_000_000_000u64,
               "end_time": 1_500_000_000u64, "attributes": attrs, "activity_id": aid})
    }

    fn completed(marker: &str, attempt: u64, status: &str, spans: Vec<Value>) -> Value {
        json!({"source": "workflow-telemetry", "event_type": "ActivityCompleted",
               "workflow_id": "wf", "run_id": "r", "workflow_type": "Fanout",
               "activity_id": marker, "activity_type": "async_io", "task_queue": "q",
               "attempt": attempt, "timestamp": "2026-01-01T00:00:00.000Z", "status": status,
               "start_time": 0.5, "end_time": 2.0, "duration_ms": 1500.0,
               "span_count": spans.len(), "spans": spans,
               "activity_input": [{"marker": marker}],
               "activity_output": if status == "completed" { json!({}) } else { Value::Null },
               "error": if status == "completed" { Value::Null } else { json!({"type": "E", "message": "m"}) }})
    }

    fn started(marker: &str, attempt: u64) -> Value {
        let mut e = completed(marker, attempt, "completed", vec![]);
        e["event_type"] = json!("ActivityStarted");
        e
    }

    fn report(events: Vec<Value>, unattributed: Vec<Value>) -> AgentReport {
        AgentReport {
            status: ExitStatus::from_raw(0),
            summary: json!({"type": "summary"}),
            stderr: String::new(),
            events,
            unattributed,
            stderr_path: PathBuf::new(),
            events_path: PathBuf::new(),
            unattributed_path: PathBuf::new(),
            metrics: Default::default(),
            metrics_text: String::new(),
        }
    }

    fn all_three(m: &str) -> Vec<Value> {
        vec![
            span(
                "GET",
                json!({"http.url": format!("https://127.0.0.1:1/e2e/{m}")}),
                m,
            ),
            span(
                "SELECT",
                json!({"db.system": "postgresql", "db.statement": format!("SELECT '{m}'::text")}),
                m,
            ),
            span(
                "file.open",
                json!({"file.path": format!("/tmp/x/{m}.txt")}),
                m,
            ),
        ]
    }

    #[test]
    fn markers_are_whole_words_so_one_is_never_a_prefix_of_another() {
        let text = format!("/e2e/{T}-001/{T}-001-attempt-2?x={T}-0011&y");
        assert_eq!(
            markers_in_text(&text, T),
            vec![
                format!("{T}-001"),
                format!("{T}-001-attempt-2"),
                format!("{T}-0011")
            ]
        );
        assert_eq!(
            markers_in_text(&format!("SELECT '{T}-007'::text"), T),
            vec![format!("{T}-007")]
        );
    }

    #[test]
    fn exact_attribution_passes() {
        let (a, b) = (format!("{T}-000"), format!("{T}-001"));
        let events = vec![
            started(&a, 1),
            started(&b, 1),
            completed(&a, 1, "completed", all_three(&a)),
            completed(&b, 1, "completed", all_three(&b)),
        ];
        let expected = [
            ExpectedActivity::new("wf", &a, &[Kind::Https, Kind::Sql, Kind::FileOpen]),
            ExpectedActivity::new("wf", &b, &[Kind::Https, Kind::Sql, Kind::FileOpen]),
        ];
        let r = report(events, vec![]);
        let got = check_attribution(&r, T, &expected);
        assert!(
            got.misattributed.is_empty() && got.missing.is_empty() && got.problems.is_empty(),
            "{got:?}"
        );
        assert_eq!(got.attributed, 6);
    }

    #[test]
    fn a_span_on_the_wrong_activity_is_misattributed_and_missing_from_its_own() {
        let (a, b) = (format!("{T}-000"), format!("{T}-001"));
        let mut spans_a = all_three(&a);
        let mut spans_b = all_three(&b);
        // b's SQL span ends up on a.
        let moved = spans_b.remove(1);
        spans_a.push(moved);
        let events = vec![
            started(&a, 1),
            started(&b, 1),
            completed(&a, 1, "completed", spans_a),
            completed(&b, 1, "completed", spans_b),
        ];
        let expected = [
            ExpectedActivity::new("wf", &a, &[Kind::Https, Kind::Sql, Kind::FileOpen]),
            ExpectedActivity::new("wf", &b, &[Kind::Https, Kind::Sql, Kind::FileOpen]),
        ];
        let unattributed = vec![json!({"reason": "no_activity", "pid": 1,
            "span": span("GET", json!({"http.url": format!("https://h/{b}")}), "")})];
        let got = check_attribution(&report(events, unattributed), T, &expected);
        assert_eq!(got.misattributed.len(), 1, "{got:?}");
        assert_eq!(got.missing, vec![(b.clone(), Kind::Sql)]);
        // The moved span still says it belongs to b while sitting on a.
        assert!(
            got.problems.iter().any(|p| p.contains("says activity_id")),
            "{got:?}"
        );
        assert_eq!(got.unattributed["no_activity"].len(), 1);
    }

    #[test]
    fn retry_attempts_are_told_apart_by_attempt_marker() {
        let a = format!("{T}-000");
        let (m1, m2) = (format!("{a}-attempt-1"), format!("{a}-attempt-2"));
        let mut first = all_three(&m1);
        for s in &mut first {
            s["activity_id"] = json!(a);
        }
        // An attempt-2 span on attempt 1.
        let mut stray = all_three(&m2).remove(0);
        stray["activity_id"] = json!(a);
        first.push(stray);
        let mut second = all_three(&m2);
        for s in &mut second {
            s["activity_id"] = json!(a);
        }
        let events = vec![
            started(&a, 1),
            started(&a, 2),
            completed(&a, 1, "failed", first),
            completed(&a, 2, "completed", second),
        ];
        let exp = |attempt: u64, status, marker: &str| ExpectedActivity {
            workflow_id: "wf".into(),
            activity_id: a.clone(),
            attempt,
            status,
            marker: marker.to_string(),
            kinds: vec![Kind::Https, Kind::Sql, Kind::FileOpen],
        };
        let expected = [exp(1, "failed", &m1), exp(2, "completed", &m2)];
        let got = check_attribution(&report(events, vec![]), T, &expected);
        assert_eq!(got.misattributed.len(), 1, "{got:?}");
        assert!(got.problems.is_empty(), "{got:?}");
    }
}
