//! SDK 2.0 hook events (openbox-core-protocol.md §3.2), end to end: a real Temporal dev
//! server, a real Python worker whose hook asks for SDK 2.0 conventions, the agent, and
//! the fake OpenBox Core.
//!
//! One activity (`gov_ops`, support/hook_ops.py) makes an HTTPS request with requests,
//! httpx and aiohttp, starts a `curl` subprocess, queries PostgreSQL with psycopg2 and
//! asyncpg, writes and reads a file, and calls a `@traced` function. Checked: each of
//! those operations reaches Core as exactly one `started` and one `completed` hook event,
//! field by field against what the activity itself saw (and the JSON Schema over every
//! request); the activity's lifecycle events frame its hook events; ActivityCompleted
//! carries no spans. The same for a worker under SDK 1.0 conventions when the agent runs
//! with `--hook-events`. A BLOCK on one hook event fails that activity with SDK 2.0's
//! `GovernanceBlock` and leaves the other activity of the worker alone.

use std::{collections::BTreeMap, time::Duration};

use openbox_e2e::GovWorld;
use serde_json::{json, Value};

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// Core, an agent and a worker whose hook asks for SDK 2.0 conventions (hook events).
fn world(name: &str, script: &Value) -> GovWorld {
    world_with(name, script, Some("2.0"), &[])
}

/// [`world`] with the worker's conventions (`None`: the agent's) and more agent flags.
fn world_with(
    name: &str,
    script: &Value,
    conventions: Option<&'static str>,
    agent_flags: &[&str],
) -> GovWorld {
    let mut w = GovWorld::new(name);
    w.sdk_conventions = conventions;
    w.start_core(script);
    let mut args = w.core().agent_args();
    args.extend(["--spool-dir".into(), w.spool_dir().display().to_string()]);
    args.extend(agent_flags.iter().map(|f| f.to_string()));
    w.start_agent(&args);
    w.start_worker();
    w
}

fn ops_workflow(w: &GovWorld, k: usize, i: usize) -> Value {
    let m = w.marker(i);
    json!({"id": w.workflow_id(k), "workflow": "GovSteps",
        "arg": {"steps": [{"activity": "gov_ops", "args": [w.item(i)], "activity_id": m}],
                "max_attempts": 1, "retry_ms": 200}})
}

fn outcome<'a>(outcomes: &'a [Value], id: &str) -> &'a Value {
    outcomes
        .iter()
        .find(|o| o["id"] == json!(id))
        .unwrap_or_else(|| panic!("no outcome for workflow {id}: {outcomes:?}"))
}

/// The evaluate bodies of activity `m`, in the order Core got them.
fn bodies_of(w: &GovWorld, m: &str) -> Vec<Value> {
    w.core()
        .evaluated(200)
        .into_iter()
        .filter(|b| s(b, "activity_id") == m)
        .collect()
}

fn is_hook(b: &Value) -> bool {
    b["hook_trigger"] == json!(true)
}

/// The one span of a hook event.
fn span(b: &Value) -> &Value {
    &b["spans"][0]
}

/// An operation's (started, completed) hook spans, by span id, in the order Core got
/// their `started`; problems with pairing go to `p`.
fn operations(hooks: &[&Value], p: &mut Vec<String>) -> Vec<(Value, Value)> {
    let mut order: Vec<String> = Vec::new();
    let mut stages: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for b in hooks {
        let sp = span(b);
        let id = s(sp, "span_id").to_string();
        if !stages.contains_key(&id) {
            order.push(id.clone());
        }
        stages.entry(id).or_default().push(sp.clone());
    }
    let mut out = Vec::new();
    for id in order {
        let got = &stages[&id];
        let names: Vec<&str> = got.iter().map(|sp| s(sp, "stage")).collect();
        if names != ["started", "completed"] {
            p.push(format!(
                "span {id} ({}): stages {names:?}, expected one started then one completed",
                s(&got[0], "name")
            ));
            continue;
        }
        out.push((got[0].clone(), got[1].clone()));
    }
    out
}

/// Compares `sp[key]` with `want`, naming the operation.
fn expect(p: &mut Vec<String>, what: &str, sp: &Value, key: &str, want: Value) {
    match sp.get(key) {
        Some(v) if *v == want => {}
        other => p.push(format!("{what}: {key} is {other:?}, expected {want}")),
    }
}

/// Checks that hold for every hook span pair: same identity, the stage's nulls, the
/// activity's trace, times in order.
fn common_problems(what: &str, started: &Value, completed: &Value, p: &mut Vec<String>) {
    for key in [
        "span_id",
        "trace_id",
        "parent_span_id",
        "name",
        "kind",
        "hook_type",
        "start_time",
    ] {
        if started[key] != completed[key] {
            p.push(format!(
                "{what}: {key} differs between started ({}) and completed ({})",
                started[key], completed[key]
            ));
        }
    }
    for key in ["end_time", "duration_ns", "error"] {
        expect(p, &format!("{what} started"), started, key, Value::Null);
    }
    expect(
        p,
        &format!("{what} started"),
        started,
        "status",
        json!({"code": "UNSET", "description": null}),
    );
    let (a, z, d) = (
        completed["start_time"].as_u64(),
        completed["end_time"].as_u64(),
        completed["duration_ns"].as_u64(),
    );
    match (a, z, d) {
        (Some(a), Some(z), Some(d)) if a <= z && z - a == d => {}
        _ => p.push(format!(
            "{what} completed: start_time {a:?}, end_time {z:?}, duration_ns {d:?} do not add up"
        )),
    }
}

/// Every hook event of `gov_ops` activity `m` (`item` its argument, `result` what it
/// returned) against what it did; `hooks` in the order Core got them.
fn ops_problems(m: &str, item: &Value, result: &Value, hooks: &[&Value]) -> Vec<String> {
    let mut p = Vec::new();
    let ops = operations(hooks, &mut p);
    let base = s(item, "https_base");
    let of_type = |t: &str| -> Vec<&(Value, Value)> {
        ops.iter()
            .filter(|(st, _)| st["hook_type"] == json!(t))
            .collect()
    };
    // One trace: the activity's; one parent for operations without their own.
    let traces: std::collections::BTreeSet<&str> =
        ops.iter().map(|(st, _)| s(st, "trace_id")).collect();
    if traces.len() != 1 {
        p.push(format!(
            "hook spans of {m} are in {} traces: {traces:?}",
            traces.len()
        ));
    }
    for (st, co) in &ops {
        common_problems(
            &format!("{} {}", s(st, "hook_type"), s(st, "name")),
            st,
            co,
            &mut p,
        );
    }

    // HTTP: the four clients, by URL.
    let http = of_type("http_request");
    let by_url = |suffix: &str| -> Option<&(Value, Value)> {
        let url = format!("{base}/{suffix}");
        let hits: Vec<_> = http
            .iter()
            .copied()
            .filter(|(st, _)| st["http_url"] == json!(url))
            .collect();
        (hits.len() == 1).then(|| hits[0])
    };
    let body_of = |k: &str| result[k]["body"].clone();
    let cases = [
        (
            "requests",
            format!("json/{m}/requests"),
            "POST",
            200,
            "application/json",
        ),
        (
            "httpx",
            format!("cookie/{m}/httpx"),
            "GET",
            200,
            "text/plain",
        ),
        (
            "aiohttp",
            format!("status/503/{m}/aiohttp"),
            "GET",
            503,
            "text/plain",
        ),
        ("curl", format!("e2e/{m}/curl"), "GET", 200, "text/plain"),
    ];
    for (client, path, method, status, content_type) in &cases {
        let (client, method, status, content_type) = (*client, *method, *status, *content_type);
        let what = format!("{client} {method} /{path}");
        let Some((st, co)) = by_url(path) else {
            p.push(format!(
                "{what}: expected exactly one started/completed pair with http_url {base}/{path}; http hook spans: {:?}",
                http.iter().map(|(st, _)| s(st, "http_url")).collect::<Vec<_>>()
            ));
            continue;
        };
        let w = format!("{what} started");
        expect(&mut p, &w, st, "http_method", json!(method));
        for key in ["http_status_code", "response_headers", "response_body"] {
            expect(&mut p, &w, st, key, Value::Null);
        }
        expect(&mut p, &w, st, "kind", json!("CLIENT"));
        let w = format!("{what} completed");
        expect(&mut p, &w, co, "http_status_code", json!(status));
        expect(
            &mut p,
            &w,
            co,
            "error",
            if status >= 400 {
                json!(format!("HTTP {status}"))
            } else {
                Value::Null
            },
        );
        let want_body = if client == "curl" {
            result["curl"]["body"].clone()
        } else {
            body_of(client)
        };
        expect(&mut p, &w, co, "response_body", want_body);
        if !s(&co["response_headers"], "content-type").starts_with(content_type) {
            p.push(format!(
                "{w}: response content-type {}",
                co["response_headers"]
            ));
        }
        for (stage, sp) in [("started", st), ("completed", co)] {
            if sp["request_headers"].as_object().is_none() {
                p.push(format!(
                    "{what} {stage}: request_headers {}",
                    sp["request_headers"]
                ));
            }
            if client == "requests" {
                let h = &sp["request_headers"];
                for secret in ["authorization", "x-api-key"] {
                    if h[secret] != json!("[REDACTED]") {
                        p.push(format!(
                            "{what} {stage}: {secret} is {}, expected [REDACTED]",
                            h[secret]
                        ));
                    }
                }
                let body = format!("{{\"m\": \"{m}\"}}");
                expect(
                    &mut p,
                    &format!("{what} {stage}"),
                    sp,
                    "request_body",
                    json!(body),
                );
            } else {
                expect(
                    &mut p,
                    &format!("{what} {stage}"),
                    sp,
                    "request_body",
                    Value::Null,
                );
            }
        }
        if client == "httpx" && co["response_headers"]["set-cookie"] != json!("[REDACTED]") {
            p.push(format!(
                "{what}: set-cookie is {}, expected [REDACTED]",
                co["response_headers"]["set-cookie"]
            ));
        }
    }
    if http.len() != cases.len() {
        p.push(format!(
            "{} HTTP operations, expected {}: {:?}",
            http.len(),
            cases.len(),
            http.iter()
                .map(|(st, _)| s(st, "http_url"))
                .collect::<Vec<_>>()
        ));
    }

    // SQL: each client's marker statement once, the server and database named.
    let db = of_type("db_query");
    for client in ["psycopg2", "asyncpg"] {
        let stmt = format!("SELECT '{m}-{client}'::text AS marker");
        let hits: Vec<_> = db
            .iter()
            .filter(|(st, _)| st["db_statement"] == json!(stmt))
            .collect();
        let [(st, co)] = hits.as_slice() else {
            p.push(format!(
                "{client}: {} query pairs with statement {stmt:?}, expected 1; statements: {:?}",
                hits.len(),
                db.iter()
                    .map(|(st, _)| s(st, "db_statement"))
                    .collect::<Vec<_>>()
            ));
            continue;
        };
        let what = format!("{client} query");
        if result[client] != json!(format!("{m}-{client}")) {
            p.push(format!("{what}: the activity got {}", result[client]));
        }
        for (stage, sp) in [("started", st), ("completed", co)] {
            let w = format!("{what} {stage}");
            expect(&mut p, &w, sp, "db_system", json!("postgresql"));
            expect(&mut p, &w, sp, "db_name", json!("shop"));
            expect(&mut p, &w, sp, "db_operation", json!("SELECT"));
            expect(&mut p, &w, sp, "server_address", json!("127.0.0.1"));
            expect(&mut p, &w, sp, "server_port", item["pg_port"].clone());
        }
        expect(
            &mut p,
            &format!("{what} started"),
            st,
            "rowcount",
            Value::Null,
        );
        expect(
            &mut p,
            &format!("{what} completed"),
            co,
            "rowcount",
            json!(1),
        );
    }
    for (st, co) in &db {
        if st["db_system"] != json!("postgresql") || co["error"] != Value::Null {
            p.push(format!(
                "db query {}: {} error {}",
                st["db_statement"], st["db_system"], co["error"]
            ));
        }
    }

    // Files: the marker file opened for writing, then for reading.
    let path = s(&result["file"], "path").to_string();
    let text_len = result["file"]["read"].as_str().map_or(0, str::len);
    let files: Vec<_> = of_type("file_operation")
        .into_iter()
        .filter(|(st, _)| st["file_path"] == json!(path))
        .collect();
    let modes: Vec<&str> = files.iter().map(|(st, _)| s(st, "file_mode")).collect();
    if modes != ["w", "r"] {
        p.push(format!(
            "opens of {path}: modes {modes:?}, expected [\"w\", \"r\"]"
        ));
    } else {
        for ((st, co), (name, op, read, written)) in files.iter().zip([
            ("file.write", "write", Value::Null, json!(text_len)),
            ("file.read", "read", json!(text_len), Value::Null),
        ]) {
            let what = format!("{name} {path}");
            expect(&mut p, &what, st, "name", json!(name));
            expect(&mut p, &what, st, "kind", json!("INTERNAL"));
            expect(&mut p, &what, st, "file_operation", json!(op));
            expect(
                &mut p,
                &format!("{what} started"),
                st,
                "bytes_read",
                Value::Null,
            );
            expect(
                &mut p,
                &format!("{what} started"),
                st,
                "bytes_written",
                Value::Null,
            );
            expect(&mut p, &format!("{what} completed"), co, "bytes_read", read);
            expect(
                &mut p,
                &format!("{what} completed"),
                co,
                "bytes_written",
                written,
            );
        }
    }

    // The @traced function.
    let fns = of_type("function_call");
    match fns.as_slice() {
        [(st, co)] => {
            let what = "@traced score";
            for (stage, sp) in [("started", st), ("completed", co)] {
                let w = format!("{what} {stage}");
                expect(&mut p, &w, sp, "name", json!("function score"));
                expect(&mut p, &w, sp, "function", json!("score"));
                expect(&mut p, &w, sp, "module", json!("hook_ops"));
                expect(
                    &mut p,
                    &w,
                    sp,
                    "args",
                    json!({"args": [m], "kwargs": {"weight": 3}}),
                );
            }
            expect(
                &mut p,
                &format!("{what} started"),
                st,
                "result",
                Value::Null,
            );
            expect(
                &mut p,
                &format!("{what} completed"),
                co,
                "result",
                result["score"].clone(),
            );
        }
        other => p.push(format!("{} @traced calls, expected 1", other.len())),
    }
    p
}

/// Every operation of the activity reaches Core as one started and one completed hook
/// event, field by field; the activity's lifecycle events frame them; ActivityCompleted
/// carries no spans; every request matches the JSON Schema.
#[test]
fn every_operation_of_an_activity_reaches_core_as_started_and_completed_hook_events() {
    operations_reach_core_as_hook_events(
        "every_operation_of_an_activity_reaches_core_as_started_and_completed_hook_events",
        Some("2.0"),
        &[],
    );
}

/// The same with a worker under SDK 1.0 conventions and the agent run with
/// `--hook-events`: the same hook events, with 1.0 headers, and ActivityCompleted
/// without spans.
#[test]
fn the_agents_hook_events_flag_sends_them_for_a_worker_under_sdk_1_0_conventions() {
    operations_reach_core_as_hook_events(
        "the_agents_hook_events_flag_sends_them_for_a_worker_under_sdk_1_0_conventions",
        None,
        &["--hook-events"],
    );
}

fn operations_reach_core_as_hook_events(
    name: &str,
    conventions: Option<&'static str>,
    agent_flags: &[&str],
) {
    let w = world_with(
        name,
        &json!({"default": {"verdict": "allow"}}),
        conventions,
        agent_flags,
    );
    let (wf, m) = (w.workflow_id(0), w.marker(0));
    let item = w.item(0);
    let outcomes = w.run(&[ops_workflow(&w, 0, 0)], RUN_TIMEOUT);
    let o = outcome(&outcomes, &wf);
    assert!(
        o["ok"] == json!(true),
        "workflow {wf} failed: {}",
        o["error"]
    );
    let result = o["result"][0].clone();
    w.core()
        .wait_for("ActivityCompleted", Duration::from_secs(30), |reqs| {
            reqs.iter().any(|r| {
                r["body"]["event_type"] == json!("ActivityCompleted")
                    && r["body"]["activity_id"] == json!(m)
            })
        });
    let env = w.env.clone();
    let schema = w.core().validate_schema(&env);
    let bodies = bodies_of(&w, &m);
    let hook_headers: Vec<Value> = w
        .core()
        .requests()
        .into_iter()
        .filter(|r| r["body"]["hook_trigger"] == json!(true))
        .map(|r| r["headers"].clone())
        .collect();
    let record = w.core().record.clone();
    let (_, agent) = w.finish();
    agent.expect("the agent ran").assert_clean_exit();

    let mut p = Vec::new();
    if let Err(out) = schema {
        p.push(format!("requests do not match the JSON Schema:\n{out}"));
    }
    // Hook events follow the worker's conventions' headers.
    let v2 = conventions == Some("2.0");
    for h in &hook_headers {
        let is_v2 = h.get("x-openbox-sdk-version").is_some() && h.get("content-type").is_none();
        let is_v1 = h["content-type"] == json!("application/json")
            && h.get("x-openbox-sdk-version").is_none();
        if (v2 && !is_v2) || (!v2 && !is_v1) {
            p.push(format!(
                "a hook event with the other conventions' headers: {h}"
            ));
        }
    }
    // Lifecycle framing: ActivityStarted first, ActivityCompleted last, hooks between.
    let kinds: Vec<&str> = bodies
        .iter()
        .map(|b| {
            if is_hook(b) {
                "hook"
            } else {
                s(b, "event_type")
            }
        })
        .collect();
    let hooks: Vec<&Value> = bodies.iter().filter(|b| is_hook(b)).collect();
    let n = kinds.len();
    if n < 2
        || kinds[0] != "ActivityStarted"
        || kinds[n - 1] != "ActivityCompleted"
        || kinds[1..n - 1].iter().any(|k| *k != "hook")
    {
        p.push(format!("events of {m} in Core's order: {kinds:?}, expected ActivityStarted, hook events, ActivityCompleted"));
    }
    if let Some(done) = bodies
        .iter()
        .find(|b| s(b, "event_type") == "ActivityCompleted" && !is_hook(b))
    {
        if done["spans"] != json!([]) || done["span_count"] != json!(0) {
            p.push(format!(
                "ActivityCompleted carries span_count {} and {} spans, expected 0 and [] (they went out as hook events)",
                done["span_count"],
                done["spans"].as_array().map_or(0, Vec::len)
            ));
        }
    }
    // Each hook event: the activity's fields, one span.
    for b in &hooks {
        for (k, v) in [
            ("source", json!("workflow-telemetry")),
            ("event_type", json!("ActivityStarted")),
            ("workflow_id", json!(wf)),
            ("workflow_type", json!("GovSteps")),
            ("activity_type", json!("gov_ops")),
            ("attempt", json!(1)),
            ("activity_input", json!([item])),
            ("span_count", json!(1)),
        ] {
            if b[k] != v {
                p.push(format!(
                    "hook event {}: {k} is {}, expected {v}",
                    span(b)["name"],
                    b[k]
                ));
            }
        }
    }
    p.extend(ops_problems(&m, &item, &result, &hooks));
    assert!(
        p.is_empty(),
        "{} problem(s) with the hook events of {m} (recorded in {}):\n{}",
        p.len(),
        record.display(),
        p.join("\n")
    );
}

/// Core blocks the curl subprocess's request at its `started` hook event: that activity
/// fails with SDK 2.0's non-retryable `GovernanceBlock` (`Governance block: <reason>`),
/// enforced when it ends (this kernel cannot hold the request before its bytes leave);
/// its later operations send no hook events and no ActivityCompleted is sent. The other
/// activity of the same worker, running at the same time, completes untouched.
#[test]
fn a_block_on_one_hook_event_fails_that_activity_and_leaves_the_other_alone() {
    let w = world(
        "a_block_on_one_hook_event_fails_that_activity_and_leaves_the_other_alone",
        &json!({}),
    );
    let (m_block, m_ok) = (w.marker(0), w.marker(1));
    // The curl request's URL names the marker: only that activity's operation matches.
    w.core().set_script(
        &json!({"rules": [{"match": {"hook_trigger": true, "spans": format!("re:/e2e/{m_block}/curl")},
                           "body": {"verdict": "block", "reason": "no curl to there"}}]}),
    );
    let (wf_block, wf_ok) = (w.workflow_id(0), w.workflow_id(1));
    let outcomes = w.run(
        &[ops_workflow(&w, 0, 0), ops_workflow(&w, 1, 1)],
        RUN_TIMEOUT,
    );
    let blocked = outcome(&outcomes, &wf_block).clone();
    let ok = outcome(&outcomes, &wf_ok).clone();
    let env = w.env.clone();
    let schema = w.core().validate_schema(&env);
    let (b_block, b_ok) = (bodies_of(&w, &m_block), bodies_of(&w, &m_ok));
    let record = w.core().record.clone();
    let (_, agent) = w.finish();
    agent.expect("the agent ran").assert_clean_exit();

    let mut p = Vec::new();
    if let Err(out) = schema {
        p.push(format!("requests do not match the JSON Schema:\n{out}"));
    }
    let chain = blocked["error"]["chain"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    match chain.iter().find(|l| l["class"] == json!("ApplicationError")) {
        Some(app)
            if app["type"] == json!("GovernanceBlock")
                && app["message"] == json!("Governance block: no curl to there")
                && app["non_retryable"] == json!(true) => {}
        _ => p.push(format!(
            "{wf_block}: expected it to fail with ApplicationError GovernanceBlock \"Governance block: no curl to there\" (non-retryable), got {}",
            if blocked["ok"] == json!(true) { blocked["result"].clone() } else { blocked["error"].clone() }
        )),
    }
    if ok["ok"] != json!(true) {
        p.push(format!("{wf_ok} (not blocked) failed: {}", ok["error"]));
    }
    // The blocked activity: its curl hook events stop at started; nothing after it.
    let curl_url = format!("/e2e/{m_block}/curl");
    let curl = |b: &&Value| s(span(b), "http_url").contains(&curl_url);
    let hooks: Vec<&Value> = b_block.iter().filter(|b| is_hook(b)).collect();
    let curl_stages: Vec<&str> = hooks
        .iter()
        .copied()
        .filter(|b| curl(b))
        .map(|b| s(span(b), "stage"))
        .collect();
    if curl_stages != ["started"] {
        p.push(format!(
            "{m_block}: curl hook event stages {curl_stages:?}, expected only started"
        ));
    }
    if let Some(at) = hooks.iter().position(curl) {
        let after: Vec<&str> = hooks[at + 1..].iter().map(|b| s(span(b), "name")).collect();
        if !after.is_empty() {
            p.push(format!(
                "{m_block}: hook events after the blocked one: {after:?}"
            ));
        }
    }
    if b_block
        .iter()
        .any(|b| s(b, "event_type") == "ActivityCompleted")
    {
        p.push(format!(
            "{m_block}: an ActivityCompleted was sent for the blocked activity"
        ));
    }
    // The other activity: its every operation, started and completed, and its end.
    let ok_hooks = b_ok.iter().filter(|b| is_hook(b)).count();
    let ok_completed = b_ok
        .iter()
        .filter(|b| s(b, "event_type") == "ActivityCompleted")
        .count();
    // 4 HTTP, 2 SQL at least, 2 files, 1 function: 2 events each.
    if ok_hooks < 18 || ok_completed != 1 {
        p.push(format!("{m_ok}: {ok_hooks} hook events and {ok_completed} ActivityCompleted, expected ≥ 18 and 1"));
    }
    assert!(
        p.is_empty(),
        "{} problem(s) (recorded in {}):\n{}",
        p.len(),
        record.display(),
        p.join("\n")
    );
}
