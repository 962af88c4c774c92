//! OTLP export, end to end: the agent sends its spans to a real OTLP backend (Jaeger
//! with in-memory storage), and the tests read the traces back through Jaeger's query
//! API — what a user looking at their tracing backend would see.
//!
//! - A workflow run is one trace: the run's span at the root, a span per activity
//!   attempt under it, each captured operation (an LLM call with its gen_ai.*
//!   attributes, a SQL query, a file write) under its activity, with the stable
//!   semantic-convention attribute names, and the same span ids Core received in
//!   ActivityCompleted.
//! - A run that continues as new ends its span there; the next run's trace links to it.
//! - A worker that traces itself with Temporal's `TracingInterceptor`: one trace holds
//!   the user's spans and ours, our activity span under the user's.
//! - `trace` exports what it captured under a root span for the traced command.
//! - A collector that never answers slows nothing: the workflow runs, governance gets
//!   every event, and the dropped spans are counted in the summary and /metrics.

use std::{collections::BTreeSet, process::Command};

use openbox_e2e::{
    logs_dir, show, start_llm, Env, Jaeger, Scenario, ScenarioOpts, TraceSpan, WorkerOpts,
};
use serde_json::{json, Value};

/// The run id's 32 hex digits: the trace id of the run.
fn trace_of_run(outcome: &Value) -> String {
    let run = outcome["run_id"]
        .as_str()
        .unwrap_or_else(|| panic!("the client reported no run_id: {outcome}"));
    run.replace('-', "")
}

fn one<'a>(spans: &'a [TraceSpan], what: &str, f: impl Fn(&TraceSpan) -> bool) -> &'a TraceSpan {
    let found: Vec<&TraceSpan> = spans.iter().filter(|s| f(s)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {what} in the trace, found {}:\n{}",
        found.len(),
        show(spans)
    );
    found[0]
}

fn children<'a>(spans: &'a [TraceSpan], parent: &TraceSpan) -> Vec<&'a TraceSpan> {
    spans
        .iter()
        .filter(|s| s.parent.as_deref() == Some(parent.span_id.as_str()))
        .collect()
}

/// Fails unless `span` hangs directly under `parent`.
fn assert_child_of(spans: &[TraceSpan], span: &TraceSpan, parent: &TraceSpan, what: &str) {
    assert_eq!(
        span.parent.as_deref(),
        Some(parent.span_id.as_str()),
        "{what} is not a child of span {} ({}):\n{}",
        parent.span_id,
        parent.name,
        show(spans)
    );
}

/// Fails if the span carries a pre-stable attribute name.
fn assert_stable_names(s: &TraceSpan, marker: &str) {
    for old in [
        "http.method",
        "http.url",
        "http.status_code",
        "db.statement",
        "db.system",
        "net.peer.name",
    ] {
        assert!(
            s.tag(old).is_none(),
            "span {} still carries the old name {old}",
            s.name
        );
    }
    assert_eq!(s.tag_str("temporal.activity.id"), marker);
}

/// The HTTPS GET of one activity (support/worker.py's `async_io`), under its activity.
fn assert_https_get_under(spans: &[TraceSpan], activity: &TraceSpan, marker: &str) {
    let http = one(spans, &format!("GET of {marker}"), |s| {
        s.tag_str("url.full").contains(marker)
    });
    assert_child_of(
        spans,
        http,
        activity,
        &format!("the HTTPS span of {marker}"),
    );
    assert_eq!(http.tag_str("http.request.method"), "GET");
    assert_eq!(http.tag("http.response.status_code"), Some(&json!(200)));
    assert_eq!(http.tag_str("server.address"), "127.0.0.1");
    assert_eq!(http.tag_str("url.scheme"), "https");
    assert_eq!(http.tag_str("url.path"), format!("/e2e/{marker}"));
    assert_stable_names(http, marker);
}

/// The LLM call of one activity (support/worker.py's `llm_io`: the `openai` client, a
/// gzip'd chat completion), under its activity, with the gen_ai.* attributes of what
/// the client got (`got`).
fn assert_llm_call_under(spans: &[TraceSpan], activity: &TraceSpan, marker: &str, got: &Value) {
    let llm = one(spans, &format!("LLM call of {marker}"), |s| {
        s.tag_str("gen_ai.response.id") == got["id"].as_str().unwrap_or("?")
    });
    assert_child_of(spans, llm, activity, &format!("the LLM call of {marker}"));
    assert_eq!(llm.tag_str("http.request.method"), "POST");
    assert!(
        llm.tag_str("url.full")
            .ends_with("/gzip/v1/chat/completions"),
        "{}",
        llm.tag_str("url.full")
    );
    assert_eq!(llm.tag("http.response.status_code"), Some(&json!(200)));
    assert_eq!(llm.tag_str("gen_ai.operation.name"), "chat");
    assert_eq!(llm.tag_str("gen_ai.provider.name"), "openai");
    assert_eq!(llm.tag_str("gen_ai.request.model"), "gpt-e2e");
    assert_eq!(llm.tag("gen_ai.response.model"), Some(&got["model"]));
    assert_eq!(
        llm.tag("gen_ai.usage.input_tokens"),
        Some(&got["input_tokens"])
    );
    assert_eq!(
        llm.tag("gen_ai.usage.output_tokens"),
        Some(&got["output_tokens"])
    );
    assert_stable_names(llm, marker);
}

/// The PostgreSQL query and the file written by one activity, under its activity (the
/// file's write under its file.open).
fn assert_sql_and_file_under(spans: &[TraceSpan], activity: &TraceSpan, marker: &str) {
    let sql = one(spans, &format!("SQL of {marker}"), |s| {
        s.tag_str("db.query.text").contains(marker)
    });
    assert_child_of(spans, sql, activity, &format!("the SQL span of {marker}"));
    assert_eq!(sql.tag_str("db.system.name"), "postgresql");
    assert_eq!(sql.tag_str("db.namespace"), "shop");
    assert_stable_names(sql, marker);
    let open = one(spans, &format!("file.open of {marker}"), |s| {
        s.name == "file.open" && s.tag_str("file.path").contains(marker)
    });
    assert_child_of(spans, open, activity, &format!("the file.open of {marker}"));
    assert!(
        children(spans, open).iter().any(|w| w.name == "file.write"),
        "no file.write under the file.open of {marker}:\n{}",
        show(spans)
    );
}

/// What `async_io` does, under its activity: HTTPS GET, SQL, file.
fn assert_io_under(spans: &[TraceSpan], activity: &TraceSpan, marker: &str) {
    assert_https_get_under(spans, activity, marker);
    assert_sql_and_file_under(spans, activity, marker);
}

/// How the agent sends its spans to Jaeger.
enum Wire {
    Http,
    Grpc,
}

/// A real Jaeger, and a scenario whose agent exports to it over `wire` (plus
/// `more_args`); with `user_traces`, the worker traces itself to the same Jaeger.
fn exporting_to_jaeger(
    name: &str,
    wire: Wire,
    more_args: &[&str],
    user_traces: bool,
) -> (Jaeger, Scenario) {
    let jaeger = Jaeger::start(&logs_dir(&format!("{name}-jaeger")));
    let mut agent_args = match wire {
        Wire::Http => vec![
            "--otlp-endpoint".to_string(),
            format!("http://127.0.0.1:{}", jaeger.otlp_http),
        ],
        Wire::Grpc => vec![
            "--otlp-endpoint".to_string(),
            format!("http://127.0.0.1:{}", jaeger.otlp_grpc),
            "--otlp-protocol".to_string(),
            "grpc".to_string(),
        ],
    };
    agent_args.extend(more_args.iter().map(|a| a.to_string()));
    let worker = WorkerOpts {
        otel_traces_url: user_traces
            .then(|| format!("http://127.0.0.1:{}/v1/traces", jaeger.otlp_http)),
        ..WorkerOpts::default()
    };
    let s = Scenario::start(
        name,
        ScenarioOpts {
            agent_args,
            worker,
            ..ScenarioOpts::default()
        },
    );
    (jaeger, s)
}

#[test]
fn a_runs_trace_holds_its_workflow_span_activity_spans_and_their_io_under_the_right_parents() {
    let name =
        "a_runs_trace_holds_its_workflow_span_activity_spans_and_their_io_under_the_right_parents";
    let (jaeger, s) =
        exporting_to_jaeger(name, Wire::Http, &["--service-name", "openbox-e2e"], false);
    let (_llm, llm_port) = start_llm(&s.env, &s.logs);
    let wf = s.workflow_id(0);
    let items: Vec<Value> = (0..2)
        .map(|i| {
            let mut item = s.item(i);
            item["llm_base"] = json!(format!("http://127.0.0.1:{llm_port}"));
            item
        })
        .collect();
    let plan = json!({"activity": "llm_io", "items": items});
    let out = s.run_ok(&[(wf.clone(), plan)]);
    let trace_id = trace_of_run(&out[0]);
    // What each activity's LLM client got, by marker.
    let got: Vec<(String, Value)> = out[0]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let r = &r["result"];
            (
                r["activity_id"].as_str().unwrap_or_default().to_string(),
                r["chat"].clone(),
            )
        })
        .collect();
    let markers = [s.marker(0), s.marker(1)];
    let done = s.finish();
    let agent = done.agent.expect("the scenario ran an agent");

    let spans = jaeger.wait_trace(
        &trace_id,
        "the workflow span and both activities' I/O",
        |spans| {
            spans.iter().any(|s| s.name == "workflow Fanout")
                && spans
                    .iter()
                    .filter(|s| s.tag("gen_ai.response.id").is_some())
                    .count()
                    == 2
                && markers.iter().all(|m| {
                    spans.iter().any(|s| {
                        s.name == "file.write" && s.tag_str("file.path").contains(m.as_str())
                    })
                })
        },
    );
    let run = one(&spans, "workflow span", |s| s.name == "workflow Fanout");
    assert_eq!(run.parent, None, "the run's span is the trace's root");
    assert_eq!(run.tag_str("temporal.workflow.id"), wf);
    assert_eq!(run.tag_str("openbox.workflow.status"), "completed");
    assert_eq!(run.service, "openbox-e2e");
    for marker in &markers {
        let act = one(&spans, &format!("activity span of {marker}"), |s| {
            s.name == "activity llm_io" && s.tag_str("temporal.activity.id") == marker
        });
        assert_eq!(
            act.parent.as_deref(),
            Some(run.span_id.as_str()),
            "activity {marker} hangs under the run's span"
        );
        assert_eq!(act.tag("temporal.activity.attempt"), Some(&json!(1)));
        assert_eq!(act.tag_str("openbox.activity.status"), "completed");
        assert_eq!(act.tag_str("openbox.governance.started.action"), "continue");
        assert_eq!(
            act.tag_str("openbox.governance.completed.action"),
            "continue"
        );
        assert!(
            act.process.contains_key("process.pid"),
            "the worker process is the resource: {:?}",
            act.process
        );
        let (_, chat) = got
            .iter()
            .find(|(m, _)| m == marker)
            .unwrap_or_else(|| panic!("no result for {marker}: {}", out[0]));
        assert_llm_call_under(&spans, act, marker, chat);
        assert_sql_and_file_under(&spans, act, marker);
    }
    // Core and the backend hold the same spans: every span of every ActivityCompleted is
    // in the trace under its id.
    let in_backend: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let completed = agent.events_of("ActivityCompleted");
    assert_eq!(completed.len(), 2, "one ActivityCompleted per activity");
    for ev in completed {
        for sp in ev["spans"].as_array().into_iter().flatten() {
            assert_eq!(
                sp["trace_id"].as_str(),
                Some(trace_id.as_str()),
                "Core's span is in the run's trace: {sp}"
            );
            let id = sp["span_id"].as_str().unwrap_or_default();
            assert!(
                in_backend.contains(id),
                "span {id} that Core got is not in the backend:\n{}",
                show(&spans)
            );
        }
    }
    let otlp = &agent.summary["otlp"];
    assert_eq!(otlp["spans_dropped_queue_full"], 0, "{otlp}");
    assert_eq!(otlp["spans_dropped_export_failed"], 0, "{otlp}");
    assert!(
        otlp["spans_exported"].as_u64().unwrap_or(0) >= spans.len() as u64,
        "{otlp}"
    );
}

/// A workflow that continues as new: each run is its own trace; the first run's span
/// ends at the continue-as-new (Core hears nothing of it, as with the SDK), and the
/// second run's span names the first and links to its span.
#[test]
fn a_run_that_continues_as_new_ends_its_trace_and_the_next_run_links_to_it() {
    let name = "a_run_that_continues_as_new_ends_its_trace_and_the_next_run_links_to_it";
    let (jaeger, s) = exporting_to_jaeger(name, Wire::Http, &[], false);
    let wf = s.workflow_id(0);
    let (first_marker, next_marker) = (s.marker(0), s.marker(1));
    let plan = json!({"activity": "async_io", "items": [s.item(0)],
        "then": {"activity": "async_io", "items": [s.item(1)]}});
    let out = s.run_ok(&[(wf.clone(), plan)]);
    // The handle the client started names the first run.
    let first_run = out[0]["run_id"].as_str().unwrap_or_default().to_string();
    let done = s.finish();
    let agent = done.agent.expect("the scenario ran an agent");
    let started: Vec<String> = agent
        .events_of("WorkflowStarted")
        .iter()
        .filter(|e| e["workflow_id"] == wf.as_str())
        .filter_map(|e| e["run_id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(started.len(), 2, "two runs started: {started:?}");
    assert!(started.contains(&first_run), "{started:?} vs {first_run}");
    let next_run = started
        .iter()
        .find(|r| **r != first_run)
        .cloned()
        .unwrap_or_default();
    let completed = agent.events_of("WorkflowCompleted");
    assert_eq!(
        completed
            .iter()
            .map(|e| e["run_id"].as_str().unwrap_or_default())
            .collect::<Vec<_>>(),
        vec![next_run.as_str()],
        "only the last run completes"
    );
    assert!(
        agent
            .events
            .iter()
            .all(|e| e["event_type"] != "WorkflowContinuedAsNew"),
        "the continue-as-new is the agent's own: Core gets no event for it"
    );

    let first_trace = first_run.replace('-', "");
    let first = jaeger.wait_trace(&first_trace, "the first run's span and activity", |sp| {
        sp.iter().any(|s| s.name == "workflow Fanout") && sp.iter().any(|s| s.name == "file.write")
    });
    let first_span = one(&first, "first run's span", |s| s.name == "workflow Fanout");
    assert_eq!(first_span.parent, None);
    assert_eq!(
        first_span.tag_str("openbox.workflow.status"),
        "continued_as_new"
    );
    let act = one(&first, "first run's activity", |s| {
        s.name == "activity async_io"
    });
    assert_child_of(&first, act, first_span, "the first run's activity");
    assert_io_under(&first, act, &first_marker);

    let next = jaeger.wait_trace(
        &next_run.replace('-', ""),
        "the next run's span and activity",
        |sp| {
            sp.iter().any(|s| s.name == "workflow Fanout")
                && sp.iter().any(|s| s.name == "file.write")
        },
    );
    let next_span = one(&next, "next run's span", |s| s.name == "workflow Fanout");
    assert_eq!(next_span.tag_str("openbox.workflow.status"), "completed");
    assert_eq!(
        next_span.tag_str("temporal.workflow.continued_run_id"),
        first_run
    );
    assert_eq!(
        next_span.links,
        vec![(first_trace.clone(), first_span.span_id.clone())],
        "the next run's span links to the first run's span"
    );
    let act = one(&next, "next run's activity", |s| {
        s.name == "activity async_io"
    });
    assert_child_of(&next, act, next_span, "the next run's activity");
    assert_io_under(&next, act, &next_marker);
    assert!(
        next.iter()
            .all(|s| s.tag_str("temporal.activity.id") != first_marker),
        "the first run's activity is not in the next run's trace"
    );
}

#[test]
fn with_a_tracing_interceptor_worker_one_trace_holds_the_users_spans_and_ours() {
    let name = "with_a_tracing_interceptor_worker_one_trace_holds_the_users_spans_and_ours";
    // gRPC this time: both wires are exercised.
    let (jaeger, s) = exporting_to_jaeger(name, Wire::Grpc, &[], true);
    let wf = s.workflow_id(0);
    let marker = s.marker(0);
    s.run_ok(&[(wf, json!({"activity": "async_io", "items": [s.item(0)]}))]);
    let done = s.finish();
    let agent = done.agent.expect("the scenario ran an agent");
    // The user's trace: the one Core's spans carry.
    let completed = agent.events_of("ActivityCompleted");
    assert_eq!(completed.len(), 1);
    let trace_id = completed[0]["spans"][0]["trace_id"]
        .as_str()
        .unwrap_or_else(|| panic!("ActivityCompleted carries no span: {}", completed[0]))
        .to_string();
    let spans = jaeger.wait_trace(
        &trace_id,
        "the user's activity span and ours with its I/O",
        |spans| {
            spans.iter().any(|s| s.name.starts_with("RunActivity:"))
                && spans.iter().any(|s| s.name == "activity async_io")
                && spans.iter().any(|s| s.name == "file.write")
        },
    );
    let users = one(&spans, "user's RunActivity span", |s| {
        s.name == "RunActivity:async_io"
    });
    assert_eq!(users.service, "e2e-worker");
    let ours = one(&spans, "our activity span", |s| {
        s.name == "activity async_io"
    });
    assert_eq!(
        ours.parent.as_deref(),
        Some(users.span_id.as_str()),
        "our activity span hangs under the user's:\n{}",
        show(&spans)
    );
    // Our run's own span stays reachable by a link.
    assert!(
        !ours.links.is_empty(),
        "our activity span links to the run's span"
    );
    assert_io_under(&spans, ours, &marker);
}

#[test]
fn a_collector_that_never_answers_slows_nothing_and_the_dropped_spans_are_counted() {
    let name = "a_collector_that_never_answers_slows_nothing_and_the_dropped_spans_are_counted";
    // Takes connections, never reads or answers.
    let blackhole = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the black hole");
    let port = blackhole.local_addr().expect("its port").port();
    let s = Scenario::start(
        name,
        ScenarioOpts {
            agent_args: vec![
                "--otlp-endpoint".into(),
                format!("http://127.0.0.1:{port}"),
                "--otlp-queue-size".into(),
                "8".into(),
            ],
            ..ScenarioOpts::default()
        },
    );
    // One activity first: its spans make the first batch, whose export then hangs on
    // the black hole (the exporter's own timeout is 10 s)...
    let first = json!({"activity": "async_io", "items": [s.item(0)]});
    s.run_ok(&[(s.workflow_id(0), first)]);
    // ...past the batch delay, so that batch is surely on its way.
    std::thread::sleep(std::time::Duration::from_secs(1));
    // Ten more while it hangs: their spans meet a full queue of 8. (Run all at once,
    // every span could make the first batch, and none meet a full queue.)
    let items: Vec<Value> = (1..11).map(|i| s.item(i)).collect();
    s.run_ok(&[(
        s.workflow_id(1),
        json!({"activity": "async_io", "items": items}),
    )]);
    let done = s.finish();
    let agent = done.agent.expect("the scenario ran an agent");
    // Governance got everything.
    assert_eq!(agent.events_of("ActivityCompleted").len(), 11);
    let otlp = &agent.summary["otlp"];
    let n = |k: &str| {
        otlp[k]
            .as_u64()
            .unwrap_or_else(|| panic!("summary otlp has no {k}: {otlp}"))
    };
    assert_eq!(n("spans_exported"), 0, "{otlp}");
    // 11 activity spans, 2 workflow spans and at least 4 I/O spans per activity (GET,
    // SQL, file.open, file.write): none exported, every one counted.
    let at_least = 11 + 2 + 11 * 4;
    assert!(
        n("spans_dropped_queue_full") + n("spans_dropped_export_failed") >= at_least,
        "{otlp}"
    );
    assert!(
        n("spans_dropped_queue_full") > 0,
        "a queue of 8 overflows: {otlp}"
    );
    assert_eq!(n("spans_queued"), 0, "{otlp}");
    agent.assert_metrics_match_summary();
    let m = |k: &str| agent.metrics.get(k).copied().unwrap_or(-1.0);
    assert!(
        m("openbox_otlp_spans_dropped_total{reason=\"queue_full\"}") > 0.0,
        "/metrics counts the drops:\n{}",
        agent.metrics_text
    );
    drop(blackhole);
}

#[test]
fn trace_exports_the_captured_spans_under_a_root_span_for_the_command() {
    let name = "trace_exports_the_captured_spans_under_a_root_span_for_the_command";
    let logs = logs_dir(name);
    let jaeger = Jaeger::start(&logs_dir(&format!("{name}-jaeger")));
    let env = Env::get();
    let file = logs.join("written-by-the-traced-command.txt");
    let out = Command::new(&env.agent)
        .args(["trace", "--json", "--otlp-endpoint"])
        .arg(format!("http://127.0.0.1:{}", jaeger.otlp_http))
        .arg("--")
        .arg(&env.python)
        .arg("-c")
        .arg(format!(
            "open({:?}, 'w').write('x')",
            file.display().to_string()
        ))
        .output()
        .expect("running openbox-agent trace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "trace failed: {stderr}");
    let spans: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let path = file.display().to_string();
    let open = spans
        .iter()
        .find(|s| s["name"] == "file.open" && s["attributes"]["file.path"] == path.as_str())
        .unwrap_or_else(|| panic!("no file.open of {path} in trace --json:\n{spans:?}"));
    let trace_id = open["trace_id"].as_str().expect("a trace id").to_string();
    let spans = jaeger.wait_trace(&trace_id, "the command's root and its file.open", |spans| {
        spans.iter().any(|s| s.name.starts_with("trace "))
            && spans.iter().any(|s| s.name == "file.write")
    });
    let root = one(&spans, "root span", |s| s.name.starts_with("trace "));
    assert_eq!(root.parent, None);
    assert_eq!(root.tag("process.exit.code"), Some(&json!(0)));
    let exported = one(&spans, "file.open", |s| {
        s.name == "file.open" && s.tag_str("file.path") == path
    });
    assert_eq!(
        exported.span_id,
        open["span_id"].as_str().unwrap_or_default(),
        "the span keeps its id"
    );
    assert_eq!(exported.parent.as_deref(), Some(root.span_id.as_str()));
    let summary: Value = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["type"] == "summary")
        .unwrap_or_else(|| panic!("no summary on stderr: {stderr}"));
    assert!(
        summary["otlp"]["spans_exported"].as_u64().unwrap_or(0) >= 3,
        "{summary}"
    );
    assert_eq!(summary["otlp"]["spans_dropped_queue_full"], 0, "{summary}");
}
