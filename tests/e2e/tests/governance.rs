//! Governance end to end: a real Temporal dev server, a real Python worker with the hook
//! (support/gov_worker.py, workflows in support/gov_workflows.py), the agent daemon
//! governing through the fake OpenBox Core (tests/fake_core/fake_core.py, which records
//! every request) or the embedded local policy, and the client (support/gov_client.py)
//! reporting each workflow's result or failure chain as the Temporal SDK shows it.
//!
//! What is checked against shared/docs/openbox-core-protocol.md: every request Core gets
//! (JSON Schema, event sequence, fields, key, spans per activity), every verdict's effect
//! on the activity (§4, §5), the fail policies and the spool when Core is down, slow,
//! failing or garbled (§6), the start-up key check (§1.4), and the embedded default.
//!
//! Each case runs under SDK 1.0 and SDK 2.0 conventions (`<case>::sdk_1_0`,
//! `<case>::sdk_2_0`: the worker's hook asks for 2.0 in `hello`, the agent follows it),
//! with the outcomes that differ computed from the conventions (HALT terminates the
//! workflow under 2.0, ActivityCompleted only for activities that returned, headers,
//! WorkflowStarted's arguments; see the harness's `conventions` module). Per-operation
//! hook events (`hook_trigger: true`) are left out of every lifecycle assertion.
//!
//! Every test leaves its processes' output, the client plans, the Core recordings
//! (`core.requests.jsonl`) and the agent's events in `target/e2e-runs/<test name>/`.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use openbox_e2e::{
    halt_problems, is_hook_event, rfc3339_utc_seconds, span_kinds, span_markers,
    under_both_conventions, validate_with_schema, FakeCore, GovAgent, GovWorld, Kind, Sdk,
    FAKE_CORE_KEY,
};
use serde_json::{json, Value};

const RUN_TIMEOUT: Duration = Duration::from_secs(90);
const EVALUATE: &str = "/api/v1/governance/evaluate";
const APPROVAL: &str = "/api/v1/governance/approval";
const VALIDATE: &str = "/api/v1/auth/validate";

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// A world whose worker follows `sdk`'s conventions: under 1.0 its hook names none, so
/// the agent's default (1.0) applies, as for a worker moved from SDK 1.0 as it is.
fn world(name: &str, sdk: Sdk) -> GovWorld {
    let mut w = GovWorld::new(name);
    if sdk == Sdk::V2 {
        w.sdk_conventions = Some("2.0");
    }
    w
}

/// The agent's arguments for `core`, plus `extra`, with the test's spool directory.
fn core_args(world: &GovWorld, extra: &[&str]) -> Vec<String> {
    let mut args = world.core().agent_args();
    args.push("--spool-dir".into());
    args.push(world.spool_dir().display().to_string());
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// One step of a `GovSteps` workflow.
fn step(activity: &str, args: Vec<Value>, activity_id: &str) -> Value {
    json!({"activity": activity, "args": args, "activity_id": activity_id})
}

/// A `GovSteps` workflow (retry every 200 ms, at most `max_attempts`).
fn steps_workflow(id: &str, steps: Vec<Value>, max_attempts: u64) -> Value {
    json!({"id": id, "workflow": "GovSteps",
           "arg": {"steps": steps, "max_attempts": max_attempts, "retry_ms": 200}})
}

/// The outcome of workflow `id`.
fn outcome<'a>(outcomes: &'a [Value], id: &str) -> &'a Value {
    outcomes
        .iter()
        .find(|o| o["id"] == json!(id))
        .unwrap_or_else(|| panic!("no outcome for workflow {id}: {outcomes:?}"))
}

/// What the client must see for a workflow whose only activity was refused or failed by
/// governance: WorkflowFailureError ← ActivityError ← ApplicationError(type, message,
/// non_retryable). `message` is matched exactly, or as a substring when it starts with
/// `~`.
fn failure_problems(
    o: &Value,
    error_type: &str,
    message: &str,
    non_retryable: bool,
) -> Vec<String> {
    let mut p = Vec::new();
    if o["ok"] == json!(true) {
        p.push(format!(
            "the workflow completed ({}), expected it to fail with {error_type}",
            o["result"]
        ));
        return p;
    }
    let chain = o["error"]["chain"].as_array().cloned().unwrap_or_default();
    let Some(app) = chain
        .iter()
        .find(|l| l["class"] == json!("ApplicationError"))
    else {
        p.push(format!(
            "no ApplicationError in the failure chain: {chain:?}"
        ));
        return p;
    };
    if app["type"] != json!(error_type) {
        p.push(format!(
            "ApplicationError type {}, expected {error_type:?} (message {})",
            app["type"], app["message"]
        ));
    }
    let got = s(app, "message");
    let ok = match message.strip_prefix('~') {
        Some(part) => got.contains(part),
        None => got == message,
    };
    if !ok {
        p.push(format!(
            "ApplicationError message {got:?}, expected {message:?}"
        ));
    }
    if app["non_retryable"] != json!(non_retryable) {
        p.push(format!(
            "ApplicationError non_retryable {}, expected {non_retryable}",
            app["non_retryable"]
        ));
    }
    if non_retryable {
        if let Some(act) = chain.iter().find(|l| l["class"] == json!("ActivityError")) {
            if act["retry_state"] != json!("NON_RETRYABLE_FAILURE") {
                p.push(format!(
                    "ActivityError retry_state {}, expected NON_RETRYABLE_FAILURE",
                    act["retry_state"]
                ));
            }
        } else {
            p.push(format!("no ActivityError in the failure chain: {chain:?}"));
        }
    }
    p
}

#[track_caller]
fn assert_failure(o: &Value, error_type: &str, message: &str, non_retryable: bool) {
    let p = failure_problems(o, error_type, message, non_retryable);
    assert!(
        p.is_empty(),
        "workflow {}: {}\noutcome: {o}",
        o["id"],
        p.join("; ")
    );
}

#[track_caller]
fn assert_ok(o: &Value) {
    assert!(
        o["ok"] == json!(true),
        "workflow {} failed: {}",
        o["id"],
        serde_json::to_string_pretty(&o["error"]).unwrap()
    );
}

/// `(event_type, activity_id)` of the lifecycle events among evaluate bodies of
/// workflow `wf`, in order.
fn sequence_of(bodies: &[Value], wf: &str) -> Vec<(String, String)> {
    bodies
        .iter()
        .filter(|b| s(b, "workflow_id") == wf && !is_hook_event(b))
        .map(|b| {
            (
                s(b, "event_type").to_string(),
                s(b, "activity_id").to_string(),
            )
        })
        .collect()
}

fn seq(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// 1. The requests
// ---------------------------------------------------------------------------------------

under_both_conventions!(every_request_to_core_matches_the_protocol_field_by_field);

/// A workflow with an HTTPS activity (which also calls a URL under Core's own base URL),
/// a signal, a PostgreSQL activity and a file activity. Every request Core gets must
/// match the JSON Schema, carry the Bearer key and its conventions' headers, come in the
/// workflow's order, carry the workflow's and activities' real values field by field
/// (under 2.0 WorkflowStarted carries the workflow's arguments too), and each
/// ActivityCompleted must hold its own activity's marker spans and nobody else's (and
/// none to Core's URL). Under 2.0 the agent also signs every request (§1.3) and the fake
/// Core verifies each signature.
fn every_request_to_core_matches_the_protocol_field_by_field(name: &str, sdk: Sdk) {
    let t0 = now_secs();
    let v2 = sdk == Sdk::V2;
    let mut w = world(name, sdk);
    if v2 {
        w.sign_requests();
    }
    w.start_core(&json!({"default": {"verdict": "allow"}}));
    let mut args = core_args(&w, &["--governance-timeout", "5"]);
    args.extend(w.signing_args());
    w.start_agent(&args);
    w.start_worker();
    let wf = w.workflow_id(0);
    let (m_http, m_sql, m_file) = (w.marker(0), w.marker(1), w.marker(2));
    let mut http_arg = w.item(0);
    http_arg["core_url"] = json!(w.core().url());
    let alias_url = format!("http://localhost:{}", w.core().port);
    http_arg["core_alias_url"] = json!(alias_url);
    let (sql_arg, file_arg) = (w.item(1), w.item(2));
    let plan = json!({"id": wf, "workflow": "GovFlow",
        "arg": {"http": http_arg, "sql": sql_arg, "file": file_arg, "max_attempts": 1},
        "signal": {"name": "proceed", "args": ["go-ahead", {"n": 1}], "query": "stage", "equals": "waiting"}});
    let workflow_arg = plan["arg"].clone();
    let outcomes = w.run(&[plan], RUN_TIMEOUT);
    let o = outcome(&outcomes, &wf).clone();
    assert_ok(&o);
    let result = &o["result"];
    let run_id = s(&o, "run_id").to_string();
    assert!(
        result["http"]["core_status"] == json!(200)
            && result["http"]["core_alias_status"] == json!(200),
        "the HTTPS activity must have called Core's URL and its alias: {result}"
    );
    // WorkflowCompleted is sent in the background: wait for it.
    w.core()
        .wait_for("WorkflowCompleted", Duration::from_secs(20), |reqs| {
            reqs.iter().any(|r| {
                r["body"]["event_type"] == json!("WorkflowCompleted")
                    && r["body"]["workflow_id"] == json!(wf)
            })
        });
    let core_url = w.core().url();
    let token = w.token.clone();
    let env = w.env.clone();
    let schema = w.core().validate_schema(&env);
    let reqs = w.core().requests();
    let record = w.core().record.clone();
    let task_queue = w.task_queue.clone();
    let (_, agent) = w.finish();
    let t1 = now_secs();
    let agent = agent.expect("the agent ran");
    agent.assert_clean_exit();

    let mut problems: Vec<String> = Vec::new();
    if let Err(out) = schema {
        problems.push(format!("requests do not match the JSON Schema:\n{out}"));
    }
    // Start-up key check first, then everything with the Bearer key, all answered.
    match reqs.first() {
        Some(r) if r["method"] == json!("GET") && r["path"] == json!(VALIDATE) => {}
        other => problems.push(format!(
            "the first request is not GET {VALIDATE}: {other:?}"
        )),
    }
    for r in &reqs {
        let what = format!("{} {}", r["method"], r["path"]);
        // The start-up validate follows the agent's own conventions (1.0 here).
        if r["path"] == json!(VALIDATE) {
            problems.extend(Sdk::V1.header_problems(r));
        } else {
            problems.extend(sdk.header_problems(r));
        }
        if v2 && r["signature"] != json!("ok") {
            problems.push(format!("{what}: signature {}", r["signature"]));
        }
        if r["headers"]["authorization"] != json!(format!("Bearer {FAKE_CORE_KEY}")) {
            problems.push(format!(
                "{} {} has authorization {}",
                r["method"], r["path"], r["headers"]["authorization"]
            ));
        }
        if r["status"] != json!(200) {
            problems.push(format!(
                "{} {} answered {}",
                r["method"], r["path"], r["status"]
            ));
        }
        if r["path"] == json!(APPROVAL) {
            problems.push(format!("an approval poll nobody asked for: {}", r["body"]));
        }
    }
    let bodies: Vec<Value> = reqs
        .iter()
        .filter(|r| r["path"] == json!(EVALUATE) && !is_hook_event(&r["body"]))
        .map(|r| r["body"].clone())
        .collect();
    // Where ActivityCompleted carries no spans (2.0: they went out as hook events, which
    // tests/hook_events.rs checks field by field), each activity's spans are read from
    // its `completed` hook events for the marker checks below.
    let span_bodies: Vec<Value> = if sdk.completed_carries_spans() {
        bodies.clone()
    } else {
        bodies
            .iter()
            .filter(|b| s(b, "event_type") == "ActivityCompleted")
            .map(|b| {
                let spans: Vec<Value> = reqs
                    .iter()
                    .map(|r| &r["body"])
                    .filter(|h| {
                        is_hook_event(h)
                            && h["activity_id"] == b["activity_id"]
                            && h["spans"][0]["stage"] == json!("completed")
                    })
                    .map(|h| {
                        let mut sp = h["spans"][0].clone();
                        sp["activity_id"] = b["activity_id"].clone();
                        // A file's hook span stands for its open.
                        if sp["hook_type"] == json!("file_operation") {
                            sp["name"] = json!("file.open");
                        }
                        sp
                    })
                    .collect();
                let mut b = b.clone();
                b["span_count"] = json!(spans.len());
                b["spans"] = json!(spans);
                b
            })
            .collect()
    };
    let got = sequence_of(&bodies, &wf);
    let want = seq(&[
        ("WorkflowStarted", ""),
        ("ActivityStarted", &m_http),
        ("ActivityCompleted", &m_http),
        ("SignalReceived", ""),
        ("ActivityStarted", &m_sql),
        ("ActivityCompleted", &m_sql),
        ("ActivityStarted", &m_file),
        ("ActivityCompleted", &m_file),
        ("WorkflowCompleted", ""),
    ]);
    if got != want {
        problems.push(format!(
            "event sequence of {wf}:\n  got  {got:?}\n  want {want:?}"
        ));
    }
    let others: Vec<&Value> = bodies
        .iter()
        .filter(|b| s(b, "workflow_id") != wf)
        .collect();
    if !others.is_empty() {
        problems.push(format!("events of other workflows: {others:?}"));
    }

    let activities = [
        (&m_http, "gov_http", &http_arg, &result["http"], Kind::Https),
        (&m_sql, "gov_sql", &sql_arg, &result["sql"], Kind::Sql),
        (
            &m_file,
            "gov_file",
            &file_arg,
            &result["file"],
            Kind::FileOpen,
        ),
    ];
    let all_markers: BTreeSet<&str> = [m_http.as_str(), m_sql.as_str(), m_file.as_str()].into();
    for b in bodies.iter().filter(|b| s(b, "workflow_id") == wf) {
        let et = s(b, "event_type");
        let who = format!("{et} {}", s(b, "activity_id"));
        let mut expect = |k: &str, v: Value| {
            if b.get(k) != Some(&v) {
                problems.push(format!("{who}: {k} is {:?}, expected {v}", b.get(k)));
            }
        };
        expect("source", json!("workflow-telemetry"));
        expect("workflow_id", json!(wf));
        expect("run_id", json!(run_id));
        expect("workflow_type", json!("GovFlow"));
        match et {
            "WorkflowStarted" => {
                expect("task_queue", json!(task_queue));
                // SDK 2.0 sends the workflow's arguments as an array (§2.2); 1.0 does not.
                if v2 {
                    expect("activity_input", json!([workflow_arg]));
                } else if b.get("activity_input").is_some() {
                    problems.push(format!("{who}: activity_input under SDK 1.0: {b}"));
                }
            }
            "SignalReceived" => {
                expect("task_queue", json!(task_queue));
                expect("signal_name", json!("proceed"));
                expect("signal_args", json!(["go-ahead", {"n": 1}]));
            }
            "WorkflowCompleted" => expect("workflow_output", result.clone()),
            "ActivityStarted" | "ActivityCompleted" => {
                let Some((m, ty, arg, out, _)) =
                    activities.iter().find(|a| a.0 == s(b, "activity_id"))
                else {
                    problems.push(format!("{who}: unknown activity"));
                    continue;
                };
                expect("activity_type", json!(ty));
                expect("task_queue", json!(task_queue));
                expect("attempt", json!(1));
                expect("activity_input", json!([arg]));
                if et == "ActivityCompleted" {
                    expect("status", json!("completed"));
                    expect("error", Value::Null);
                    expect("activity_output", (*out).clone());
                    if !sdk.completed_carries_spans() {
                        expect("span_count", json!(0));
                        expect("spans", json!([]));
                    }
                    let b = span_bodies
                        .iter()
                        .find(|c| s(c, "event_type") == et && c["activity_id"] == b["activity_id"])
                        .unwrap_or(b);
                    problems.extend(
                        completed_span_problems(b, m, &all_markers, &token, &core_url)
                            .into_iter()
                            .map(|p| format!("{who}: {p}")),
                    );
                }
            }
            _ => problems.push(format!("unexpected event {who}")),
        }
        match b
            .get("timestamp")
            .and_then(Value::as_str)
            .and_then(rfc3339_utc_seconds)
        {
            Some(ts) if ts >= t0 - 2.0 && ts <= t1 + 2.0 => {}
            _ => problems.push(format!(
                "{who}: timestamp {:?} is not the time of the test ({t0:.0}..{t1:.0})",
                b.get("timestamp")
            )),
        }
    }
    // The same server under another name than Core's URL is reported: so the call to
    // Core's URL was captured too, and left out on purpose.
    let alias_spans = span_bodies
        .iter()
        .filter(|b| s(b, "event_type") == "ActivityCompleted" && s(b, "activity_id") == m_http)
        .flat_map(|b| b["spans"].as_array().cloned().unwrap_or_default())
        .filter(|sp| {
            sp["attributes"]["http.url"].as_str()
                == Some(format!("{alias_url}/_control?m={m_http}").as_str())
        })
        .count();
    if alias_spans != 1 {
        problems.push(format!(
            "ActivityCompleted {m_http} has {alias_spans} spans of GET {alias_url}/_control?m={m_http} (the same server as Core under another name), expected 1"
        ));
    }
    // Each activity's own kind of marker span.
    for (m, _, _, _, kind) in &activities {
        let has = span_bodies.iter().any(|b| {
            s(b, "event_type") == "ActivityCompleted"
                && s(b, "activity_id") == m.as_str()
                && b["spans"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|sp| span_kinds(sp, &token, m).contains(kind))
        });
        if !has {
            problems.push(format!(
                "ActivityCompleted {m} has no {kind:?} span with its marker"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) with the requests Core got (recorded in {}):\n{}",
        problems.len(),
        record.display(),
        problems.join("\n")
    );
}

/// Spans of one ActivityCompleted: `span_count` right, every span its own (its
/// `activity_id`, only its own marker), inside the activity's time window, none to
/// Core's URL.
fn completed_span_problems(
    b: &Value,
    marker: &str,
    all_markers: &BTreeSet<&str>,
    token: &str,
    core_url: &str,
) -> Vec<String> {
    let mut p = Vec::new();
    let spans = b["spans"].as_array().cloned().unwrap_or_default();
    if b["span_count"] != json!(spans.len()) {
        p.push(format!(
            "span_count {} but {} spans",
            b["span_count"],
            spans.len()
        ));
    }
    let (start, end) = (b["start_time"].as_f64(), b["end_time"].as_f64());
    match (start, end, b["duration_ms"].as_f64()) {
        (Some(a), Some(z), Some(d)) if a <= z && (d - (z - a) * 1000.0).abs() < 2.0 => {}
        other => p.push(format!(
            "start_time/end_time/duration_ms inconsistent: {other:?}"
        )),
    }
    for sp in &spans {
        let name = s(sp, "name");
        if let Some(aid) = sp.get("activity_id").and_then(Value::as_str) {
            if aid != marker {
                p.push(format!("span {name} says activity_id {aid}"));
            }
        }
        for m in span_markers(sp, token) {
            if m != marker {
                let whose = if all_markers.contains(m.as_str()) {
                    "another activity's"
                } else {
                    "an unknown"
                };
                p.push(format!(
                    "span {name} carries {whose} marker {m}: {}",
                    sp["attributes"]
                ));
            }
        }
        let url = sp["attributes"]["http.url"].as_str().unwrap_or("");
        if url.starts_with(&format!("{core_url}/")) {
            p.push(format!("span {name} to Core's own URL {url}"));
        }
        if let (Some(a), Some(z)) = (start, end) {
            let (lo, hi) = ((a - 2.0) * 1e9, (z + 2.0) * 1e9);
            let (x, y) = (sp["start_time"].as_f64(), sp["end_time"].as_f64());
            if !matches!((x, y), (Some(x), Some(y)) if x >= lo && y <= hi) {
                p.push(format!("span {name} outside the activity's time window"));
            }
        }
    }
    p
}

// ---------------------------------------------------------------------------------------
// 2. Verdicts
// ---------------------------------------------------------------------------------------

enum Expect {
    /// The workflow returns `[this]` (the activity's result).
    Result(Value),
    /// It fails with ApplicationError(type, message — `~` = substring —, non_retryable).
    Fails(&'static str, String, bool),
    /// A HALT with this reason (`~` = substring): the activity fails with GovernanceHalt
    /// (1.0) or the workflow is terminated (2.0); see `halt_problems`.
    Halted(&'static str),
}

struct Case {
    name: &'static str,
    activity: &'static str,
    args: Vec<Value>,
    /// Evaluate rules (their `match` gets `activity_id`).
    rules: Vec<Value>,
    /// Approval poll answers for this activity, in order (the last repeats).
    approvals: Vec<Value>,
    max_attempts: u64,
    expect: Expect,
    /// The attempts whose body ran.
    ran: Vec<u64>,
    /// ActivityStarted requests and approval polls Core must get for it.
    started: usize,
    polls: usize,
    /// The `activity_input` ActivityCompleted must carry (after input redaction).
    completed_input: Option<Value>,
}

fn on_started(body: Value) -> Value {
    json!({"match": {"event_type": "ActivityStarted"}, "body": body})
}

fn on_started_once(body: Value) -> Value {
    json!({"match": {"event_type": "ActivityStarted"}, "body": body, "times": 1})
}

fn on_completed(body: Value) -> Value {
    json!({"match": {"event_type": "ActivityCompleted"}, "body": body})
}

under_both_conventions!(each_core_verdict_is_enforced_on_the_activity_as_the_sdk_does);

/// One workflow per verdict, all at once on one worker, agent and Core: the outcome the
/// client sees is the SDK's (error type, message, retryability; a HALT terminates the
/// workflow under 2.0), the activity body runs only when it may (and sees the redacted
/// arguments), approvals are polled, and Core gets an ActivityCompleted for every attempt
/// that returned (under 2.0 for those only).
fn each_core_verdict_is_enforced_on_the_activity_as_the_sdk_does(name: &str, sdk: Sdk) {
    let mut w = world(name, sdk);
    let dir = w.files.display().to_string();
    let p = |w: &GovWorld, i: usize| json!({"marker": w.marker(i), "dir": dir, "text": "my SSN is 123-45-6789", "secret": "s3cr3t"});
    let echo = |w: &GovWorld, i: usize, attempt: u64| json!({"got": p(w, i), "attempt": attempt});
    let mut cases: Vec<Case> = Vec::new();
    let mut add = |c: Case| cases.push(c);
    let plain = |name, i: usize, rules: Vec<Value>, expect: Expect, ran: Vec<u64>| Case {
        name,
        activity: "echo",
        args: vec![p(&w, i)],
        rules,
        approvals: vec![],
        max_attempts: 3,
        expect,
        ran,
        started: 1,
        polls: 0,
        completed_input: None,
    };
    // Case k uses marker k (the order of the `add` calls).
    add(plain(
        "allow",
        0,
        vec![on_started(json!({"verdict": "allow"}))],
        Expect::Result(echo(&w, 0, 1)),
        vec![1],
    ));
    add(plain(
        "constrain",
        1,
        vec![on_started(
            json!({"verdict": "constrain", "reason": "watch it"}),
        )],
        Expect::Result(echo(&w, 1, 1)),
        vec![1],
    ));
    add(plain(
        "block",
        2,
        vec![on_started(
            json!({"verdict": "block", "reason": "blocked by e2e"}),
        )],
        Expect::Fails(
            "GovernanceBlock",
            "Governance blocked: blocked by e2e".into(),
            true,
        ),
        vec![],
    ));
    add(plain(
        "halt",
        3,
        vec![on_started(
            json!({"verdict": "halt", "reason": "halted by e2e"}),
        )],
        Expect::Halted("halted by e2e"),
        vec![],
    ));
    add(Case {
        approvals: vec![
            json!({"body": {"verdict": "require_approval"}}),
            json!({"body": {"verdict": "allow"}}),
        ],
        max_attempts: 6,
        started: 2,
        polls: 2,
        ..plain(
            "approval_pending_then_approved",
            4,
            vec![on_started_once(
                json!({"verdict": "require_approval", "reason": "needs a human"}),
            )],
            Expect::Result(echo(&w, 4, 3)),
            vec![3],
        )
    });
    add(Case {
        approvals: vec![json!({"body": {"verdict": "block", "reason": "a human said no"}})],
        max_attempts: 6,
        polls: 1,
        ..plain(
            "approval_rejected",
            5,
            vec![on_started(
                json!({"verdict": "require_approval", "reason": "needs a human"}),
            )],
            Expect::Fails(
                "ApprovalRejected",
                "Activity rejected: a human said no".into(),
                true,
            ),
            vec![],
        )
    });
    add(Case {
        approvals: vec![json!({"body": {"verdict": "require_approval", "expired": true}})],
        max_attempts: 6,
        polls: 1,
        ..plain(
            "approval_expired",
            6,
            vec![on_started(
                json!({"verdict": "require_approval", "reason": "needs a human"}),
            )],
            Expect::Fails("ApprovalExpired", "~Approval expired".into(), true),
            vec![],
        )
    });
    add(Case {
        approvals: vec![
            json!({"body": {"verdict": "require_approval", "approval_expiration_time": "2020-01-01T00:00:00Z"}}),
        ],
        max_attempts: 6,
        polls: 1,
        ..plain(
            "approval_expiration_time_passed",
            7,
            vec![on_started(json!({"verdict": "require_approval"}))],
            Expect::Fails("ApprovalExpired", "~Approval expired".into(), true),
            vec![],
        )
    });
    add(plain(
        "guardrails_validation_failed",
        8,
        vec![on_started(
            json!({"verdict": "allow", "guardrails_result": {
            "input_type": "activity_input", "validation_passed": false,
            "reasons": [{"type": "pii", "field": "text", "reason": "contains an SSN"},
                        {"type": "pii", "field": "secret", "reason": "contains a secret"}]}}),
        )],
        Expect::Fails(
            "GuardrailsValidationFailed",
            "Guardrails validation failed: contains an SSN; contains a secret".into(),
            true,
        ),
        vec![],
    ));
    // Input redaction, dataclass argument: merged field by field into the real argument.
    let dc = json!({"prompt": "my SSN is 123-45-6789", "user": "ann", "secret": "s3cr3t",
                    "dir": dir, "note": w.marker(9)});
    let dc_redacted = json!({"prompt": "my SSN is [REDACTED]", "user": "ann", "secret": "[REDACTED]",
                             "dir": dir, "note": w.marker(9)});
    add(Case {
        activity: "echo_dc",
        args: vec![dc],
        completed_input: Some(json!([dc_redacted])),
        ..plain(
            "redact_input_dataclass",
            9,
            vec![on_started(
                json!({"verdict": "allow", "guardrails_result": {
                "input_type": "activity_input", "validation_passed": true,
                "redacted_input": [{"prompt": "my SSN is [REDACTED]", "secret": "[REDACTED]"}]}}),
            )],
            Expect::Result(json!({"got": dc_redacted, "was_dataclass": true, "attempt": 1})),
            vec![1],
        )
    });
    // Input redaction, plain dict argument: replaced (an object is a one-element list).
    let dict_redacted = json!({"text": "[REDACTED]", "dir": dir});
    add(Case {
        completed_input: Some(json!([dict_redacted])),
        ..plain(
            "redact_input_plain_dict",
            10,
            vec![on_started(
                json!({"verdict": "allow", "guardrails_result": {
                "input_type": "activity_input", "redacted_input": dict_redacted}}),
            )],
            Expect::Result(json!({"got": dict_redacted, "attempt": 1})),
            vec![1],
        )
    });
    add(Case {
        activity: "answer",
        ..plain(
            "redact_output",
            11,
            vec![on_completed(
                json!({"verdict": "allow", "guardrails_result": {
                "input_type": "activity_output", "redacted_input": {"answer": "[REDACTED]"}}}),
            )],
            Expect::Result(json!({"answer": "[REDACTED]"})),
            vec![1],
        )
    });
    add(plain(
        "v1_action_continue",
        12,
        vec![on_started(json!({"action": "continue"}))],
        Expect::Result(echo(&w, 12, 1)),
        vec![1],
    ));
    add(plain(
        "v1_action_stop",
        13,
        vec![on_started(
            json!({"action": "stop", "reason": "stopped by v1"}),
        )],
        Expect::Halted("stopped by v1"),
        vec![],
    ));
    add(Case {
        approvals: vec![json!({"body": {"action": "continue"}})],
        max_attempts: 6,
        started: 2,
        polls: 1,
        ..plain(
            "v1_action_require_approval_then_continue",
            14,
            vec![on_started_once(
                json!({"action": "require-approval", "reason": "v1 approval"}),
            )],
            Expect::Result(echo(&w, 14, 2)),
            vec![2],
        )
    });
    // A BLOCK answer to ActivityCompleted: the work happened, the result is refused.
    add(plain(
        "block_on_completed",
        15,
        vec![on_completed(
            json!({"verdict": "block", "reason": "result refused"}),
        )],
        Expect::Fails(
            "GovernanceBlock",
            "Governance blocked: result refused".into(),
            true,
        ),
        vec![1],
    ));
    // An approval answer naming no decision (§5): SDK 1.0 reads it as granted, SDK 2.0 as
    // still pending, so the activity runs one attempt later.
    let v2 = sdk == Sdk::V2;
    let runs_at = if v2 { 3 } else { 2 };
    add(Case {
        approvals: vec![json!({"body": {}}), json!({"body": {"verdict": "allow"}})],
        max_attempts: 6,
        started: 2,
        polls: if v2 { 2 } else { 1 },
        ..plain(
            "approval_answer_without_a_decision",
            16,
            vec![on_started_once(
                json!({"verdict": "require_approval", "reason": "needs a human"}),
            )],
            Expect::Result(echo(&w, 16, runs_at)),
            vec![runs_at],
        )
    });

    // One script: each case's rules and approvals keyed by its activity id.
    let mut rules = Vec::new();
    let mut approvals = Vec::new();
    for (k, c) in cases.iter().enumerate() {
        let m = w.marker(k);
        for r in &c.rules {
            let mut r = r.clone();
            r["match"]["activity_id"] = json!(m);
            rules.push(r);
        }
        if !c.approvals.is_empty() {
            approvals.push(json!({"match": {"activity_id": m}, "responses": c.approvals}));
        }
    }
    // Run-level verdicts (§4.2): a BLOCK answer to SignalReceived fails the run's next
    // activity; so does a HALT answer to WorkflowStarted (the agent's choice, see the
    // governance module docs). Both events reach the agent in the background.
    let (wf_sig, wf_start) = (w.workflow_id(100), w.workflow_id(101));
    rules.push(
        json!({"match": {"event_type": "SignalReceived", "workflow_id": wf_sig},
                      "body": {"verdict": "block", "reason": "signal refused"}}),
    );
    rules.push(
        json!({"match": {"event_type": "WorkflowStarted", "workflow_id": wf_start},
                      "body": {"verdict": "halt", "reason": "workflow refused"}}),
    );
    w.start_core(
        &json!({"default": {"verdict": "allow"}, "rules": rules, "approvals": approvals,
                         "approval_default": {"verdict": "require_approval"}}),
    );
    let args = core_args(&w, &["--governance-timeout", "5"]);
    w.start_agent(&args);
    w.start_worker();
    let mut plans: Vec<Value> = cases
        .iter()
        .enumerate()
        .map(|(k, c)| {
            steps_workflow(
                &w.workflow_id(k),
                vec![step(c.activity, c.args.clone(), &w.marker(k))],
                c.max_attempts,
            )
        })
        .collect();
    plans.push(json!({"id": wf_sig, "workflow": "GovFlow",
        "arg": {"http": w.item(100), "sql": w.item(101), "file": w.item(102), "max_attempts": 3},
        "signal": {"name": "proceed", "args": ["go-ahead", {"n": 2}], "query": "stage", "equals": "waiting"}}));
    plans.push(steps_workflow(
        &wf_start,
        vec![step("echo", vec![p(&w, 103)], &w.marker(103))],
        3,
    ));
    let outcomes = w.run(&plans, RUN_TIMEOUT);
    let reqs = w.core().requests();
    let record = w.core().record.clone();

    let mut problems = Vec::new();
    for (k, c) in cases.iter().enumerate() {
        let (wf, m) = (w.workflow_id(k), w.marker(k));
        let o = outcome(&outcomes, &wf);
        let mut p = match &c.expect {
            Expect::Result(v) => {
                if o["ok"] != json!(true) {
                    vec![format!("failed, expected the result {v}: {}", o["error"])]
                } else if o["result"] != json!([v]) {
                    vec![format!("returned {}, expected [{v}]", o["result"])]
                } else {
                    vec![]
                }
            }
            Expect::Fails(ty, msg, nr) => failure_problems(o, ty, msg, *nr),
            Expect::Halted(reason) => halt_problems(o, sdk, reason),
        };
        let ran = w.ran_attempts(&m);
        if ran != c.ran {
            p.push(format!(
                "the activity body ran on attempts {ran:?}, expected {:?}",
                c.ran
            ));
        }
        let started: Vec<&Value> = reqs
            .iter()
            .filter(|r| {
                r["path"] == json!(EVALUATE)
                    && r["body"]["event_type"] == json!("ActivityStarted")
                    && r["body"]["activity_id"] == json!(m)
                    && !is_hook_event(&r["body"])
            })
            .collect();
        if started.len() != c.started {
            p.push(format!(
                "Core got {} ActivityStarted, expected {} (attempts {:?})",
                started.len(),
                c.started,
                started
                    .iter()
                    .map(|r| r["body"]["attempt"].clone())
                    .collect::<Vec<_>>()
            ));
        }
        let polls: Vec<&Value> = reqs
            .iter()
            .filter(|r| r["path"] == json!(APPROVAL) && r["body"]["activity_id"] == json!(m))
            .collect();
        if polls.len() != c.polls {
            p.push(format!(
                "Core got {} approval polls, expected {}",
                polls.len(),
                c.polls
            ));
        }
        for poll in &polls {
            let want = json!({"workflow_id": wf, "run_id": o["run_id"], "activity_id": m});
            if poll["body"] != want {
                p.push(format!(
                    "approval poll body {}, expected {want}",
                    poll["body"]
                ));
            }
        }
        let completed: Vec<&Value> = reqs
            .iter()
            .filter(|r| {
                r["path"] == json!(EVALUATE)
                    && r["body"]["event_type"] == json!("ActivityCompleted")
                    && r["body"]["activity_id"] == json!(m)
            })
            .collect();
        p.extend(completed_problems(&completed, c.ran.len(), sdk));
        if let Some(input) = &c.completed_input {
            let completed: Vec<&Value> = completed
                .into_iter()
                .filter(|r| r["body"]["status"] == json!("completed"))
                .collect();
            match completed.as_slice() {
                [one] if one["body"]["activity_input"] == *input => {}
                [one] => p.push(format!(
                    "ActivityCompleted activity_input {}, expected {input}",
                    one["body"]["activity_input"]
                )),
                more => p.push(format!("{} ActivityCompleted, expected 1", more.len())),
            }
        }
        if !p.is_empty() {
            problems.push(format!("{} ({wf}): {}", c.name, p.join("; ")));
        }
    }
    let run_level = [
        (
            "signal_block_fails_the_next_activity",
            &wf_sig,
            "GovernanceBlock",
            "Governance blocked: signal refused",
            w.marker(101),
        ),
        (
            "workflow_started_halt_fails_the_first_activity",
            &wf_start,
            "GovernanceHalt",
            "workflow refused",
            w.marker(103),
        ),
    ];
    for (name, wf, ty, msg, failing) in &run_level {
        let o = outcome(&outcomes, wf);
        let halt = *ty == "GovernanceHalt";
        let mut p = if halt {
            halt_problems(o, sdk, msg)
        } else {
            failure_problems(o, ty, msg, true)
        };
        let act = o["error"]["chain"]
            .as_array()
            .and_then(|c| c.iter().find(|l| l["class"] == json!("ActivityError")));
        // A terminated workflow's failure names no activity.
        let names_activity = !(halt && sdk.halt_terminates());
        if names_activity
            && o["ok"] == json!(false)
            && act.map(|a| &a["activity_id"]) != Some(&json!(failing))
        {
            p.push(format!(
                "the failed activity is {:?}, expected {failing}",
                act.map(|a| &a["activity_id"])
            ));
        }
        if !w.ran_attempts(failing).is_empty() {
            p.push(format!(
                "the refused activity's body ran on attempts {:?}",
                w.ran_attempts(failing)
            ));
        }
        if !p.is_empty() {
            problems.push(format!("{name} ({wf}): {}", p.join("; ")));
        }
    }
    let env = w.env.clone();
    let schema = w.core().validate_schema(&env);
    let (_, agent) = w.finish();
    agent.expect("the agent ran").assert_clean_exit();
    if let Err(out) = schema {
        problems.push(format!("requests do not match the JSON Schema:\n{out}"));
    }
    assert!(
        problems.is_empty(),
        "{} of {} verdict cases wrong (Core recording {}):\n{}",
        problems.len(),
        cases.len() + run_level.len(),
        record.display(),
        problems.join("\n")
    );
}

/// What is wrong with the ActivityCompleted requests Core got for one activity
/// (`completed`) whose body ran and returned in `returned` attempts: one `completed` event
/// per such attempt; others (`failed`, for attempts that did not return) only under 1.0.
fn completed_problems(completed: &[&Value], returned: usize, sdk: Sdk) -> Vec<String> {
    let mut p = Vec::new();
    let statuses: Vec<&str> = completed
        .iter()
        .map(|r| r["body"]["status"].as_str().unwrap_or(""))
        .collect();
    let ok = statuses.iter().filter(|st| **st == "completed").count();
    if ok != returned {
        p.push(format!(
            "Core got {ok} ActivityCompleted with status completed, expected {returned} (one per attempt that returned)"
        ));
    }
    let others: Vec<&str> = statuses
        .into_iter()
        .filter(|st| *st != "completed")
        .collect();
    if sdk.completed_only_when_returned() && !others.is_empty() {
        p.push(format!(
            "Core got ActivityCompleted with status {others:?}: under SDK {sdk} it is sent only for an activity that returned"
        ));
    }
    p
}

under_both_conventions!(governance_settings_skip_lists_start_event_and_hitl_are_honoured);

/// The SDK's settings as agent flags: `--send-start-event false` (no WorkflowStarted),
/// `--skip-signal` (no SignalReceived), `--skip-activity-type` (no event at all for that
/// type, so Core's verdict cannot stop it), `--hitl-enabled false` (REQUIRE_APPROVAL
/// continues without polling).
fn governance_settings_skip_lists_start_event_and_hitl_are_honoured(name: &str, sdk: Sdk) {
    let mut w = world(name, sdk);
    let (wf_flow, wf_hitl, wf_skip) = (w.workflow_id(0), w.workflow_id(1), w.workflow_id(2));
    let (m_hitl, m_skip) = (w.marker(3), w.marker(4));
    w.start_core(&json!({"rules": [
        {"match": {"event_type": "ActivityStarted", "activity_id": m_hitl},
         "body": {"verdict": "require_approval", "reason": "needs a human"}},
        {"match": {"activity_id": m_skip}, "body": {"verdict": "block", "reason": "never asked"}},
    ]}));
    let args = core_args(
        &w,
        &[
            "--governance-timeout",
            "5",
            "--send-start-event",
            "false",
            "--skip-signal",
            "proceed",
            "--skip-activity-type",
            "answer",
            "--skip-activity-type",
            "send_governance_event",
            "--hitl-enabled",
            "false",
        ],
    );
    w.start_agent(&args);
    w.start_worker();
    let dir = w.files.display().to_string();
    let arg = |m: &str| json!({"marker": m, "dir": dir});
    let plans = [
        json!({"id": wf_flow, "workflow": "GovFlow",
               "arg": {"http": w.item(0), "sql": w.item(1), "file": w.item(2), "max_attempts": 1},
               "signal": {"name": "proceed", "args": ["go-ahead", {"n": 3}], "query": "stage", "equals": "waiting"}}),
        steps_workflow(&wf_hitl, vec![step("echo", vec![arg(&m_hitl)], &m_hitl)], 3),
        steps_workflow(
            &wf_skip,
            vec![step("answer", vec![arg(&m_skip)], &m_skip)],
            3,
        ),
    ];
    let outcomes = w.run(&plans, RUN_TIMEOUT);
    for o in &outcomes {
        assert_ok(o);
    }
    w.core().wait_for(
        "the three WorkflowCompleted",
        Duration::from_secs(20),
        |reqs| {
            reqs.iter()
                .filter(|r| r["body"]["event_type"] == json!("WorkflowCompleted"))
                .count()
                == 3
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let reqs = w.core().requests();
    let bodies = w.core().lifecycle(200);
    let record = w.core().record.clone();
    let mut problems = Vec::new();
    let got = sequence_of(&bodies, &wf_flow);
    let want = seq(&[
        ("ActivityStarted", &w.marker(0)),
        ("ActivityCompleted", &w.marker(0)),
        ("ActivityStarted", &w.marker(1)),
        ("ActivityCompleted", &w.marker(1)),
        ("ActivityStarted", &w.marker(2)),
        ("ActivityCompleted", &w.marker(2)),
        ("WorkflowCompleted", ""),
    ]);
    if got != want {
        problems.push(format!(
            "{wf_flow} (no WorkflowStarted, no SignalReceived expected):\n  got  {got:?}\n  want {want:?}"
        ));
    }
    let got = sequence_of(&bodies, &wf_skip);
    if got != seq(&[("WorkflowCompleted", "")]) {
        problems.push(format!(
            "{wf_skip}: the skipped activity type was sent to Core: {got:?}"
        ));
    }
    if w.ran_attempts(&m_skip) != vec![1] || w.ran_attempts(&m_hitl) != vec![1] {
        problems.push(format!(
            "attempts that ran: skipped type {:?}, REQUIRE_APPROVAL without HITL {:?}; expected [1] and [1]",
            w.ran_attempts(&m_skip),
            w.ran_attempts(&m_hitl)
        ));
    }
    if reqs.iter().any(|r| r["path"] == json!(APPROVAL)) {
        problems.push("approval polled with --hitl-enabled false".into());
    }
    let (_, agent) = w.finish();
    agent.expect("the agent ran").assert_clean_exit();
    assert!(
        problems.is_empty(),
        "{}\n(recording {})",
        problems.join("\n"),
        record.display()
    );
}

// ---------------------------------------------------------------------------------------
// 3. Core down
// ---------------------------------------------------------------------------------------

/// Delivered (status 200) evaluate bodies of the workflows `wfs`, as `(workflow_id,
/// event_type, activity_id)`, in the order Core answered them.
fn delivered(core: &FakeCore, wfs: &[String]) -> Vec<(String, String, String)> {
    core.lifecycle(200)
        .iter()
        .filter(|b| wfs.iter().any(|w| w == s(b, "workflow_id")))
        .map(|b| {
            (
                s(b, "workflow_id").to_string(),
                s(b, "event_type").to_string(),
                s(b, "activity_id").to_string(),
            )
        })
        .collect()
}

fn triples(items: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    items
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect()
}

/// Every evaluate request Core got about the workflows `wfs` carries `sdk`'s headers
/// (spooled events keep their worker's conventions, across agent restarts too).
#[track_caller]
fn assert_headers_of(core: &FakeCore, wfs: &[String], sdk: Sdk) {
    let problems: Vec<String> = core
        .requests()
        .iter()
        .filter(|r| {
            r["path"] == json!(EVALUATE) && wfs.iter().any(|w| w == s(&r["body"], "workflow_id"))
        })
        .flat_map(|r| sdk.header_problems(r))
        .collect();
    assert!(
        problems.is_empty(),
        "{}\n(recording {})",
        problems.join("\n"),
        core.record.display()
    );
}

/// Waits until Core has the last of `want`, then a little longer (a duplicate would come
/// right after), and compares.
#[track_caller]
fn assert_delivered_once_in_order(
    core: &FakeCore,
    wfs: &[String],
    want: &[(String, String, String)],
    timeout: Duration,
) {
    let last = want.last().expect("something to deliver").clone();
    let deadline = Instant::now() + timeout;
    while !delivered(core, wfs).contains(&last) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let got = delivered(core, wfs);
    assert!(
        got == want,
        "spooled events delivered to Core (status 200), in order:\n  got  {got:#?}\n  want {want:#?}\n(recording {})",
        core.record.display()
    );
}

under_both_conventions!(
    core_down_under_fail_open_workflows_complete_and_spooled_events_arrive_once_in_order
);

/// fail_open, Core refusing connections: the workflows complete, the workflow events and
/// ActivityCompleted wait in the spool, and once Core is back each arrives exactly once,
/// in the order it happened (ActivityStarted, which needs an answer at once, is not
/// spooled); afterwards Core's verdicts apply again.
fn core_down_under_fail_open_workflows_complete_and_spooled_events_arrive_once_in_order(
    name: &str,
    sdk: Sdk,
) {
    let mut w = world(name, sdk);
    w.start_core(
        &json!({"rules": [{"match": {"event_type": "ActivityStarted", "activity_id": w.marker(3)},
                                    "body": {"verdict": "block", "reason": "back in charge"}}]}),
    );
    let args = core_args(
        &w,
        &[
            "--governance-policy",
            "fail_open",
            "--governance-timeout",
            "2",
        ],
    );
    w.start_agent(&args);
    w.start_worker();
    let (wf0, wf1, wf2) = (w.workflow_id(0), w.workflow_id(1), w.workflow_id(2));
    let (m0, m1, m2, m3) = (w.marker(0), w.marker(1), w.marker(2), w.marker(3));
    let dir = w.files.display().to_string();
    let arg = |m: &str| json!({"marker": m, "dir": dir});

    w.core().down();
    let down_at = now_secs();
    let o = w.run(
        &[steps_workflow(
            &wf0,
            vec![
                step("echo", vec![arg(&m0)], &m0),
                step("answer", vec![arg(&m1)], &m1),
            ],
            1,
        )],
        RUN_TIMEOUT,
    );
    assert_ok(&o[0]);
    // wf0's WorkflowCompleted is on its way in the background: let it reach the spool
    // before wf1 starts, so the order is wf0's events, then wf1's.
    let wait_wc = |w: &GovWorld, wf: &str| {
        let wf = wf.to_string();
        w.agent()
            .wait_for_events("WorkflowCompleted", Duration::from_secs(20), move |ev| {
                ev.iter()
                    .any(|e| s(e, "event_type") == "WorkflowCompleted" && s(e, "workflow_id") == wf)
            })
    };
    wait_wc(&w, &wf0);
    let o = w.run(
        &[steps_workflow(
            &wf1,
            vec![step("echo", vec![arg(&m2)], &m2)],
            1,
        )],
        RUN_TIMEOUT,
    );
    assert_ok(&o[0]);
    wait_wc(&w, &wf1);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        w.core().lifecycle(200).is_empty(),
        "Core got events while it was down?"
    );
    w.core().up();
    let up_at = now_secs();
    let wfs = vec![wf0.clone(), wf1.clone()];
    let want = triples(&[
        (&wf0, "WorkflowStarted", ""),
        (&wf0, "ActivityCompleted", &m0),
        (&wf0, "ActivityCompleted", &m1),
        (&wf0, "WorkflowCompleted", ""),
        (&wf1, "WorkflowStarted", ""),
        (&wf1, "ActivityCompleted", &m2),
        (&wf1, "WorkflowCompleted", ""),
    ]);
    assert_delivered_once_in_order(w.core(), &wfs, &want, Duration::from_secs(60));
    assert_headers_of(w.core(), &wfs, sdk);
    // They carry the time they happened, not the time they were delivered.
    for b in w
        .core()
        .lifecycle(200)
        .iter()
        .filter(|b| wfs.iter().any(|x| x == s(b, "workflow_id")))
    {
        let ts = b["timestamp"].as_str().and_then(rfc3339_utc_seconds);
        assert!(
            ts.is_some_and(|t| t >= down_at - 1.0 && t <= up_at + 0.5),
            "a spooled event's timestamp is not the time it happened (down {down_at:.3}, up {up_at:.3}): {b}"
        );
    }
    // Core's verdicts apply again once the backlog is gone.
    let o = w.run(
        &[steps_workflow(
            &wf2,
            vec![step("echo", vec![arg(&m3)], &m3)],
            3,
        )],
        RUN_TIMEOUT,
    );
    assert_failure(
        &o[0],
        "GovernanceBlock",
        "Governance blocked: back in charge",
        true,
    );
    w.agent_mut().assert_running();
    let schema = w.core().validate_schema(&w.env.clone());
    let (_, agent) = w.finish();
    let agent = agent.expect("the agent ran");
    agent.assert_clean_exit();
    assert_eq!(
        agent.governance_stat("spool_pending"),
        Some(0),
        "summary: {:?}",
        agent.summary
    );
    // Under 2.0 each activity's file operation (its `ran-` mark) is spooled too, as its
    // started and completed hook events.
    let hook_events = if sdk.completed_carries_spans() { 0 } else { 6 };
    assert_eq!(
        agent.governance_stat("delivered_from_spool"),
        Some(7 + hook_events),
        "summary: {:?}",
        agent.summary
    );
    schema.unwrap_or_else(|out| panic!("requests do not match the JSON Schema:\n{out}"));
}

under_both_conventions!(spooled_events_survive_an_agent_restart_while_core_is_down);

/// fail_open, Core answering nothing to evaluate (it still validates keys): events spooled
/// by one agent are delivered by the next one started on the same `--spool-dir`, exactly
/// once and in order, together with the events of a workflow run under the second agent,
/// each with its worker's conventions.
fn spooled_events_survive_an_agent_restart_while_core_is_down(name: &str, sdk: Sdk) {
    let mut w = world(name, sdk);
    let dead = json!({"rules": [{"match": {}, "close": true}]});
    w.start_core(&dead);
    let args = core_args(
        &w,
        &[
            "--governance-policy",
            "fail_open",
            "--governance-timeout",
            "2",
        ],
    );
    w.start_agent(&args);
    w.start_worker();
    let (wf0, wf1) = (w.workflow_id(0), w.workflow_id(1));
    let (m0, m1) = (w.marker(0), w.marker(1));
    let dir = w.files.display().to_string();
    let arg = |m: &str| json!({"marker": m, "dir": dir});
    let o = w.run(
        &[steps_workflow(
            &wf0,
            vec![step("echo", vec![arg(&m0)], &m0)],
            1,
        )],
        RUN_TIMEOUT,
    );
    assert_ok(&o[0]);
    let wf = wf0.clone();
    w.agent()
        .wait_for_events("WorkflowCompleted", Duration::from_secs(20), move |ev| {
            ev.iter()
                .any(|e| s(e, "event_type") == "WorkflowCompleted" && s(e, "workflow_id") == wf)
        });
    std::thread::sleep(Duration::from_millis(500));
    let first = w.stop_agent();
    first.assert_clean_exit();
    // Under 2.0 also the activity's file operation, as its two hook events.
    let hook_events = if sdk.completed_carries_spans() { 0 } else { 2 };
    assert_eq!(
        first.governance_stat("spool_pending"),
        Some(3 + hook_events),
        "the first agent should stop with wf0's WorkflowStarted, ActivityCompleted and WorkflowCompleted (and under 2.0 the hook events of its file operation) spooled; summary {:?}",
        first.summary
    );

    // Same spool directory, Core still not taking events.
    w.start_agent(&args);
    let o = w.run(
        &[steps_workflow(
            &wf1,
            vec![step("echo", vec![arg(&m1)], &m1)],
            1,
        )],
        RUN_TIMEOUT,
    );
    assert_ok(&o[0]);
    let wf = wf1.clone();
    w.agent().wait_for_events(
        "wf1's ActivityStarted and WorkflowCompleted",
        Duration::from_secs(20),
        move |ev| {
            ev.iter()
                .any(|e| s(e, "event_type") == "WorkflowCompleted" && s(e, "workflow_id") == wf)
                && ev
                    .iter()
                    .any(|e| s(e, "event_type") == "ActivityStarted" && s(e, "workflow_id") == wf)
        },
    );
    assert!(
        w.core().lifecycle(200).is_empty(),
        "Core took events while it should not"
    );
    w.core()
        .set_script(&json!({"default": {"verdict": "allow"}}));
    let want = triples(&[
        (&wf0, "WorkflowStarted", ""),
        (&wf0, "ActivityCompleted", &m0),
        (&wf0, "WorkflowCompleted", ""),
        (&wf1, "WorkflowStarted", ""),
        (&wf1, "ActivityCompleted", &m1),
        (&wf1, "WorkflowCompleted", ""),
    ]);
    let wfs = [wf0.clone(), wf1.clone()];
    assert_delivered_once_in_order(w.core(), &wfs, &want, Duration::from_secs(60));
    assert_headers_of(w.core(), &wfs, sdk);
    let (_, agent) = w.finish();
    let agent = agent.expect("the second agent ran");
    agent.assert_clean_exit();
    assert_eq!(
        agent.governance_stat("spool_pending"),
        Some(0),
        "summary: {:?}",
        agent.summary
    );
}

under_both_conventions!(a_workflow_run_while_the_spool_drains_reaches_core_in_its_own_order);

/// Core is reachable again but still fails one old spooled event (HTTP 503, retryable),
/// so the spool keeps a backlog while a new workflow runs: nothing may overtake the
/// spooled events, so Core gets the new workflow's events in the workflow's own order,
/// each once. Its ActivityStarted, which needs an answer at once and is never spooled,
/// meets the failure policy instead (fail_open: the activity runs without a verdict)
/// rather than reach Core before its WorkflowStarted.
fn a_workflow_run_while_the_spool_drains_reaches_core_in_its_own_order(name: &str, sdk: Sdk) {
    let mut w = world(name, sdk);
    let (wf0, wf1) = (w.workflow_id(0), w.workflow_id(1));
    let (m0, m1) = (w.marker(0), w.marker(1));
    w.start_core(
        &json!({"rules": [{"match": {"event_type": "WorkflowStarted", "workflow_id": wf0},
                                    "status": 503, "body": {"detail": "try again later"}}]}),
    );
    let args = core_args(
        &w,
        &[
            "--governance-policy",
            "fail_open",
            "--governance-timeout",
            "2",
        ],
    );
    w.start_agent(&args);
    w.start_worker();
    let dir = w.files.display().to_string();
    let arg = |m: &str| json!({"marker": m, "dir": dir});
    let o = w.run(
        &[steps_workflow(
            &wf0,
            vec![step("echo", vec![arg(&m0)], &m0)],
            1,
        )],
        RUN_TIMEOUT,
    );
    assert_ok(&o[0]);
    let o = w.run(
        &[steps_workflow(
            &wf1,
            vec![step("echo", vec![arg(&m1)], &m1)],
            1,
        )],
        RUN_TIMEOUT,
    );
    assert_ok(&o[0]);
    let wf = wf1.clone();
    w.agent().wait_for_events(
        "wf1's WorkflowCompleted",
        Duration::from_secs(20),
        move |ev| {
            ev.iter()
                .any(|e| s(e, "event_type") == "WorkflowCompleted" && s(e, "workflow_id") == wf)
        },
    );
    w.core().set_script(&json!({}));
    let wfs = [wf0.clone(), wf1.clone()];
    let last = (wf1.clone(), "WorkflowCompleted".to_string(), String::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !delivered(w.core(), &wfs).contains(&last) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let bodies = w.core().lifecycle(200);
    let got = sequence_of(&bodies, &wf1);
    let record = w.core().record.clone();
    let (_, agent) = w.finish();
    agent.expect("the agent ran").assert_clean_exit();
    let want = seq(&[
        ("WorkflowStarted", ""),
        ("ActivityCompleted", &m1),
        ("WorkflowCompleted", ""),
    ]);
    assert_eq!(
        got,
        want,
        "the events of {wf1}, which Core never failed, reached Core out of the workflow's order \
         while the spool held older events (recording {})",
        record.display()
    );
}

under_both_conventions!(core_down_under_fail_closed_halts_the_activity);

/// fail_closed, Core refusing connections: the activity does not run and is halted with
/// "Governance API error: …" (1.0: the non-retryable GovernanceHalt fails it; 2.0: the
/// workflow is terminated); once Core is back activities run again.
fn core_down_under_fail_closed_halts_the_activity(name: &str, sdk: Sdk) {
    let mut w = world(name, sdk);
    w.start_core(&json!({}));
    let args = core_args(
        &w,
        &[
            "--governance-policy",
            "fail_closed",
            "--governance-timeout",
            "2",
        ],
    );
    w.start_agent(&args);
    w.start_worker();
    let (wf0, wf1) = (w.workflow_id(0), w.workflow_id(1));
    let (m0, m1) = (w.marker(0), w.marker(1));
    let dir = w.files.display().to_string();
    let arg = |m: &str| json!({"marker": m, "dir": dir});
    w.core().down();
    let o = w.run(
        &[steps_workflow(
            &wf0,
            vec![step("echo", vec![arg(&m0)], &m0)],
            3,
        )],
        RUN_TIMEOUT,
    );
    let p = halt_problems(&o[0], sdk, "~Governance API error");
    assert!(p.is_empty(), "{}\noutcome: {}", p.join("; "), o[0]);
    assert_eq!(
        w.ran_attempts(&m0),
        Vec::<u64>::new(),
        "the halted activity's body ran"
    );
    w.core().up();
    // wf0's spooled events reach Core first, when the spool's backoff wait ends (new
    // events never cut it short); until then wf1's activity would meet fail_closed too.
    // The last of them: a terminated workflow (2.0) reports no failure.
    let wfs = [wf0.clone()];
    let last = if sdk.halt_terminates() {
        "WorkflowStarted"
    } else {
        "WorkflowFailed"
    };
    let last = (wf0.clone(), last.to_string(), String::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !delivered(w.core(), &wfs).contains(&last) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = w.run(
        &[steps_workflow(
            &wf1,
            vec![step("echo", vec![arg(&m1)], &m1)],
            3,
        )],
        RUN_TIMEOUT,
    );
    assert_ok(&o[0]);
    assert_eq!(w.ran_attempts(&m1), vec![1]);
    w.agent_mut().assert_running();
    if sdk.halt_terminates() {
        let got = sequence_of(&w.core().lifecycle(200), &wf0);
        assert_eq!(
            got,
            seq(&[("WorkflowStarted", "")]),
            "wf0 was terminated before its activity ran: no other event"
        );
    }
    let (_, agent) = w.finish();
    agent.expect("the agent ran").assert_clean_exit();
}

// ---------------------------------------------------------------------------------------
// 4. Slow, failing and garbled Core answers
// ---------------------------------------------------------------------------------------

/// ActivityStarted answered after 4 s (timeout 2 s; the late answer would block), with
/// HTTP 500, and with a non-JSON 200: the fail policy decides the first two, the third
/// continues under both policies; the agent keeps running and governing.
fn slow_failing_and_garbled_answers(name: &str, policy: &str, sdk: Sdk) {
    let mut w = world(name, sdk);
    let token = w.token.clone();
    let m = move |k: usize| format!("{token}-{k:03}");
    let rule = |k: usize, extra: Value| {
        let mut r = json!({"match": {"event_type": "ActivityStarted", "activity_id": m(k)}});
        for (key, v) in extra.as_object().unwrap() {
            r[key] = v.clone();
        }
        r
    };
    let script = json!({"rules": [
        rule(0, json!({"delay": 4, "body": {"verdict": "block", "reason": "too late to count"}})),
        rule(1, json!({"status": 500, "body": {"detail": "Core failed"}})),
        rule(2, json!({"raw": "this is not JSON"})),
        rule(3, json!({"body": {"verdict": "block", "reason": "still governing"}})),
    ]});
    w.start_core(&script);
    let args = core_args(
        &w,
        &["--governance-policy", policy, "--governance-timeout", "2"],
    );
    w.start_agent(&args);
    w.start_worker();
    let dir = w.files.display().to_string();
    let plans: Vec<Value> = (0..3)
        .map(|k| {
            steps_workflow(
                &w.workflow_id(k),
                vec![step(
                    "echo",
                    vec![json!({"marker": m(k), "dir": dir})],
                    &m(k),
                )],
                3,
            )
        })
        .collect();
    let started = Instant::now();
    let outcomes = w.run(&plans, RUN_TIMEOUT);
    let took = started.elapsed();
    let mut problems = Vec::new();
    for (k, what) in ["slower than the timeout", "HTTP 500", "non-JSON 200"]
        .iter()
        .enumerate()
    {
        let o = outcome(&outcomes, &w.workflow_id(k));
        let continues = policy == "fail_open" || k == 2;
        let p = if continues {
            let mut p = Vec::new();
            if o["ok"] != json!(true) {
                p.push(format!("failed: {}", o["error"]));
            }
            if w.ran_attempts(&m(k)) != vec![1] {
                p.push(format!(
                    "body ran on attempts {:?}, expected [1]",
                    w.ran_attempts(&m(k))
                ));
            }
            p
        } else {
            let mut p = halt_problems(o, sdk, "~Governance API error");
            if !w.ran_attempts(&m(k)).is_empty() {
                p.push(format!(
                    "the halted activity's body ran on attempts {:?}",
                    w.ran_attempts(&m(k))
                ));
            }
            p
        };
        if !p.is_empty() {
            problems.push(format!(
                "{policy}, Core {what} ({}): {}",
                m(k),
                p.join("; ")
            ));
        }
    }
    // The slow answer must not have been waited for much past the 2 s timeout.
    if took > Duration::from_secs(30) {
        problems.push(format!("the workflows took {took:?}"));
    }
    w.agent_mut().assert_running();
    let wf3 = w.workflow_id(3);
    let o = w.run(
        &[steps_workflow(
            &wf3,
            vec![step(
                "echo",
                vec![json!({"marker": m(3), "dir": dir})],
                &m(3),
            )],
            3,
        )],
        RUN_TIMEOUT,
    );
    problems.extend(
        failure_problems(
            &o[0],
            "GovernanceBlock",
            "Governance blocked: still governing",
            true,
        )
        .into_iter()
        .map(|p| format!("{policy}, afterwards Core's block is not enforced: {p}")),
    );
    w.agent_mut().assert_running();
    let record = w.core().record.clone();
    let (_, agent) = w.finish();
    agent.expect("the agent ran").assert_clean_exit();
    assert!(
        problems.is_empty(),
        "{}\n(Core recording {})",
        problems.join("\n"),
        record.display()
    );
}

under_both_conventions!(
    slow_failing_or_garbled_core_under_fail_open_continues_and_the_agent_keeps_governing,
    slow_or_failing_core_under_fail_closed_halts_but_non_json_continues,
);

fn slow_failing_or_garbled_core_under_fail_open_continues_and_the_agent_keeps_governing(
    name: &str,
    sdk: Sdk,
) {
    slow_failing_and_garbled_answers(name, "fail_open", sdk);
}

fn slow_or_failing_core_under_fail_closed_halts_but_non_json_continues(name: &str, sdk: Sdk) {
    slow_failing_and_garbled_answers(name, "fail_closed", sdk);
}

// ---------------------------------------------------------------------------------------
// 5. Start-up key check
// ---------------------------------------------------------------------------------------

/// (log name, agent arguments, extra environment)
type KeyCase<'a> = (&'a str, &'a [String], &'a [(&'a str, &'a str)]);

under_both_conventions!(agent_with_a_key_core_refuses_exits_non_zero_naming_the_key);

/// Core refuses the key (401 to GET /api/v1/auth/validate): the agent does not start; it
/// exits non-zero saying the key was refused, given by flag or by OPENBOX_* environment.
/// The check follows the agent's own conventions (`--sdk-conventions`, here `sdk`): its
/// headers are theirs.
fn agent_with_a_key_core_refuses_exits_non_zero_naming_the_key(name: &str, sdk: Sdk) {
    let mut w = GovWorld::new(name);
    w.start_core(&json!({}));
    let url = w.core().url();
    let wrong = "obx_test_not_the_right_key";
    let flag_args: Vec<String> = vec![
        "--openbox-url".into(),
        url.clone(),
        "--openbox-api-key".into(),
        wrong.into(),
        "--sdk-conventions".into(),
        sdk.as_str().into(),
    ];
    let cases: [KeyCase; 2] = [
        ("agent-flags", &flag_args, &[]),
        (
            "agent-env",
            &flag_args[4..],
            &[("OPENBOX_URL", url.as_str()), ("OPENBOX_API_KEY", wrong)],
        ),
    ];
    for (name, args, env) in cases {
        let before = w.core().requests().len();
        let (status, stderr) = GovAgent::start_expecting_exit(
            &w.env,
            &w.logs,
            name,
            &w.socket,
            args,
            env,
            Duration::from_secs(60),
        );
        assert!(
            !status.success(),
            "{name}: the agent exited {status} with a refused key\nstderr: {stderr}"
        );
        let lower = stderr.to_lowercase();
        assert!(
            lower.contains("api key")
                && (lower.contains("refused")
                    || lower.contains("invalid")
                    || lower.contains("rejected")),
            "{name}: the agent's message does not say the API key was refused:\n{stderr}"
        );
        assert!(
            !w.socket.exists(),
            "{name}: the agent left its socket {}",
            w.socket.display()
        );
        let reqs = w.core().requests();
        let validate: Vec<&Value> = reqs[before..]
            .iter()
            .filter(|r| r["path"] == json!(VALIDATE))
            .collect();
        assert!(
            validate.len() == 1
                && validate[0]["status"] == json!(401)
                && validate[0]["headers"]["authorization"] == json!(format!("Bearer {wrong}")),
            "{name}: expected one GET {VALIDATE} with the wrong key, answered 401: {validate:?}"
        );
        let headers = sdk.header_problems(validate[0]);
        assert!(headers.is_empty(), "{name}: {}", headers.join("; "));
        assert!(
            reqs[before..].iter().all(|r| r["path"] == json!(VALIDATE)),
            "{name}: requests after the refused key: {:?}",
            &reqs[before..]
        );
    }
}

// ---------------------------------------------------------------------------------------
// 6. Embedded default
// ---------------------------------------------------------------------------------------

under_both_conventions!(
    embedded_local_policy_blocks_an_activity_type_and_the_sink_holds_the_events
);

/// No Core URL: the local policy file blocks one activity type; that activity fails with
/// GovernanceBlock without running, the other runs, and the JSON-lines sink holds the
/// workflow's events in order (valid against the schema's event definitions of the
/// worker's conventions).
fn embedded_local_policy_blocks_an_activity_type_and_the_sink_holds_the_events(
    name: &str,
    sdk: Sdk,
) {
    let mut w = world(name, sdk);
    let policy = w.tmp.join("policy.toml");
    std::fs::write(
        &policy,
        "default_verdict = \"allow\"\n\n[[rules]]\nname = \"no-answers\"\nevent_type = \"ActivityStarted\"\nactivity_type = \"answer\"\nverdict = \"block\"\nreason = \"answers are not allowed here\"\n",
    )
    .unwrap();
    w.start_agent(&["--policy-file".into(), policy.display().to_string()]);
    w.start_worker();
    let wf = w.workflow_id(0);
    let (m0, m1) = (w.marker(0), w.marker(1));
    let dir = w.files.display().to_string();
    let arg = |m: &str| json!({"marker": m, "dir": dir});
    let o = w.run(
        &[steps_workflow(
            &wf,
            vec![
                step("echo", vec![arg(&m0)], &m0),
                step("answer", vec![arg(&m1)], &m1),
            ],
            3,
        )],
        RUN_TIMEOUT,
    );
    assert_failure(
        &o[0],
        "GovernanceBlock",
        "Governance blocked: answers are not allowed here",
        true,
    );
    assert_eq!(
        w.ran_attempts(&m0),
        vec![1],
        "the allowed activity must run once"
    );
    assert_eq!(
        w.ran_attempts(&m1),
        Vec::<u64>::new(),
        "the blocked activity must not run"
    );
    let wfc = wf.clone();
    w.agent()
        .wait_for_events("WorkflowFailed", Duration::from_secs(20), move |ev| {
            ev.iter()
                .any(|e| s(e, "event_type") == "WorkflowFailed" && s(e, "workflow_id") == wfc)
        });
    let env = w.env.clone();
    let logs = w.logs.clone();
    let (_, agent) = w.finish();
    let agent = agent.expect("the agent ran");
    agent.assert_clean_exit();
    let events: Vec<Value> = agent
        .events
        .iter()
        .filter(|e| s(e, "workflow_id") == wf)
        .cloned()
        .collect();
    let got: Vec<(String, String)> = sequence_of(&events, &wf)
        .into_iter()
        // Whether the refused activity gets an ActivityCompleted (failed) is the agent's
        // choice (SDK 1.0 sent one from its `finally`); it must not be a completed one.
        .filter(|(et, a)| !(et == "ActivityCompleted" && a == &m1))
        .collect();
    let want = seq(&[
        ("WorkflowStarted", ""),
        ("ActivityStarted", &m0),
        ("ActivityCompleted", &m0),
        ("ActivityStarted", &m1),
        ("WorkflowFailed", ""),
    ]);
    assert_eq!(
        got,
        want,
        "the sink's events of {wf} ({})",
        agent.events_path.display()
    );
    let done = events
        .iter()
        .find(|e| s(e, "event_type") == "ActivityCompleted" && s(e, "activity_id") == m0)
        .unwrap();
    assert_eq!(done["status"], json!("completed"), "{done}");
    assert_eq!(done["activity_output"]["got"], arg(&m0), "{done}");
    let refused: Vec<&Value> = events
        .iter()
        .filter(|e| s(e, "event_type") == "ActivityCompleted" && s(e, "activity_id") == m1)
        .collect();
    for e in &refused {
        assert_eq!(
            e["status"],
            json!("failed"),
            "the blocked activity's ActivityCompleted: {e}"
        );
    }
    assert!(
        !sdk.completed_only_when_returned() || refused.is_empty(),
        "an ActivityCompleted for the blocked activity under SDK {sdk}: {refused:?}"
    );
    let failed = events
        .iter()
        .find(|e| s(e, "event_type") == "WorkflowFailed")
        .unwrap();
    assert_eq!(
        failed["error"]["cause"]["error_type"],
        json!("GovernanceBlock"),
        "{failed}"
    );
    assert_eq!(
        failed["error"]["cause"]["non_retryable"],
        json!(true),
        "{failed}"
    );
    // Every sink line is a valid evaluate body.
    let wrapped = logs.join("sink-bodies.jsonl");
    std::fs::write(
        &wrapped,
        agent
            .events
            .iter()
            .map(|e| json!({ "body": e }).to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    validate_with_schema(&env, &wrapped, Some(sdk.evaluate_schema_def()))
        .unwrap_or_else(|out| panic!("the sink's events do not match the schema:\n{out}"));
}

#[test]
fn rfc3339_parser_matches_known_times() {
    assert_eq!(rfc3339_utc_seconds("1970-01-01T00:00:00.000Z"), Some(0.0));
    assert_eq!(
        rfc3339_utc_seconds("2026-01-15T10:30:45.123Z"),
        Some(1_768_473_045.123)
    );
    assert_eq!(
        rfc3339_utc_seconds("2000-03-01T00:00:00Z"),
        Some(951_868_800.0)
    );
    assert_eq!(rfc3339_utc_seconds("2026-01-15 10:30:45"), None);
}
