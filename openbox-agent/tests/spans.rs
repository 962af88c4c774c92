//! Spans as a user sees them from `openbox-agent trace --json -- COMMAND`: real clients
//! (httpx, requests, urllib3, aiohttp, curl, psycopg2, asyncpg, PyMySQL, redis-py,
//! pymongo, plain file I/O) against real local servers (tls_server.py, PostgreSQL,
//! MariaDB, Redis, FerretDB), each span checked against what the client itself got and
//! against the in-process SDK's span JSON (openbox-core-protocol.md §3.1).
//!
//! Run with `cargo xtask test` (it installs the servers and virtualenvs and runs the tests
//! one at a time). Each run's output is kept in target/test-traces/<test>.jsonl.

mod common;

use std::{collections::BTreeMap, fs};

use common::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn result_json(out: &TempDir) -> Value {
    let path = out.join("result.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "the traced client wrote no {} ({e}): it failed; its error is in the agent's stderr",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("result.json is JSON")
}

fn attr<'a>(s: &'a Value, key: &str) -> &'a Value {
    &s["attributes"][key]
}

fn status_code(s: &Value) -> &str {
    s["status"]["code"].as_str().unwrap_or("")
}

fn status_description(s: &Value) -> &str {
    s["status"]["description"].as_str().unwrap_or("")
}

#[track_caller]
fn expect_eq(s: &Value, what: &str, actual: &Value, expected: &Value) {
    assert_eq!(actual, expected, "{what} of span {s}");
}

/// A number, or the same number as a string (error codes may be either).
fn num_or_str_eq(v: &Value, n: i64) -> bool {
    v.as_i64() == Some(n) || v.as_str() == Some(n.to_string().as_str())
}

fn py(env: &TestEnv, script: &str, args: &[String]) -> Vec<String> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.python_command(script, &args)
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

struct HttpExpect {
    method: String,
    target: String,
    status: u64,
    request_body: Option<String>,
    response_body: Option<String>,
    request_headers: Vec<(String, String)>,
    response_headers: Vec<(String, String)>,
}

fn reason(code: u64) -> &'static str {
    match code {
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => panic!("no reason phrase for {code} in this test"),
    }
}

/// One HTTP client span: name, kind, the SDK's HTTP attributes, status, bodies, headers.
#[track_caller]
fn check_http_span(s: &Value, scheme: &str, port: u16, e: &HttpExpect) {
    expect_eq(s, "name", &s["name"], &json!(e.method));
    expect_eq(s, "kind", &s["kind"], &json!("CLIENT"));
    let want = [
        ("http.method", json!(e.method)),
        (
            "http.url",
            json!(format!("{scheme}://127.0.0.1:{port}{}", e.target)),
        ),
        ("http.target", json!(e.target)),
        ("http.host", json!(format!("127.0.0.1:{port}"))),
        ("http.scheme", json!(scheme)),
        ("http.status_code", json!(e.status)),
        ("net.peer.name", json!("127.0.0.1")),
        ("net.peer.port", json!(port)),
    ];
    for (k, v) in want {
        expect_eq(s, k, attr(s, k), &v);
    }
    if e.status >= 400 {
        expect_eq(s, "status.code", &s["status"]["code"], &json!("ERROR"));
        expect_eq(
            s,
            "status.description",
            &s["status"]["description"],
            &json!(format!("HTTP {} {}", e.status, reason(e.status))),
        );
    } else {
        // The SDK's instrumentations leave 2xx spans UNSET.
        expect_eq(
            s,
            "status",
            &s["status"],
            &json!({"code": "UNSET", "description": null}),
        );
    }
    expect_eq(
        s,
        "request_body",
        &s["request_body"],
        &json!(e.request_body),
    );
    expect_eq(
        s,
        "response_body",
        &s["response_body"],
        &json!(e.response_body),
    );
    for (k, v) in &e.request_headers {
        expect_eq(
            s,
            &format!("request_headers.{k}"),
            &s["request_headers"][k],
            &json!(v),
        );
    }
    for (k, v) in &e.response_headers {
        expect_eq(
            s,
            &format!("response_headers.{k}"),
            &s["response_headers"][k],
            &json!(v),
        );
    }
}

/// The six requests of client_http.py, from what the client got back (result.json).
fn http_expectations(lib: &str, port: u16, result: &Value) -> Vec<HttpExpect> {
    let results = result.as_array().expect("result.json: a list");
    assert_eq!(
        results.len(),
        6,
        "client_http.py made six requests: {result}"
    );
    let host = format!("127.0.0.1:{port}");
    let h = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    results
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let ctype = r["headers"]
                .as_object()
                .and_then(|m| {
                    m.iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                        .map(|(_, v)| v.as_str().unwrap_or("").to_string())
                })
                .unwrap_or_default();
            let mut request_headers = h(&[("host", &host)]);
            let mut response_headers = vec![("content-type".to_string(), ctype)];
            let mut request_body = None;
            match i {
                0 => {
                    request_headers.extend(h(&[
                        ("authorization", "[REDACTED]"),
                        ("x-marker", &format!("{lib}-get")),
                    ]));
                }
                1 => {
                    request_headers.extend(h(&[("content-type", "application/json")]));
                    request_body = Some(format!("{{\"marker\": \"{lib}-post\"}}"));
                }
                5 => {
                    response_headers.extend(h(&[
                        ("set-cookie", "[REDACTED]"),
                        ("x-marker", &format!("{lib}-cookie")),
                    ]));
                }
                _ => {}
            }
            HttpExpect {
                method: str_of(r, "method").to_string(),
                target: str_of(r, "target").to_string(),
                status: u64_of(r, "status"),
                request_body,
                response_body: r["body"].as_str().map(str::to_string),
                request_headers,
                response_headers,
            }
        })
        .collect()
}

/// client_http.py LIB against tls_server.py: exactly six spans on the server's port,
/// each matching its request and the response the client got.
fn http_client_spans(lib: &str, tls: bool) {
    let env = TestEnv::get();
    let server = Server::http(&env, tls, 0);
    let scheme = if tls { "https" } else { "http" };
    let out = TempDir::new(&format!("http-{lib}"));
    let base = format!("{scheme}://127.0.0.1:{}", server.port);
    let run = trace_spans(
        &env,
        &format!("spans-http-{lib}-{scheme}"),
        &py(&env, "client_http.py", &[lib.into(), base, out.arg()]),
    );
    let expected = http_expectations(lib, server.port, &result_json(&out));
    let spans = run.on_port(server.port);
    assert_eq!(
        spans.len(),
        expected.len(),
        "{lib} over {scheme}: expected one span per request, got:\n{}",
        run.show(&spans)
    );
    for (s, e) in spans.iter().zip(&expected) {
        check_http_span(s, scheme, server.port, e);
    }
    assert_eq!(
        run.summary_u64("ringbuf_drops"),
        0,
        "ring-buffer drops: {}",
        run.summary
    );
}

impl SpanRun {
    fn summary_u64(&self, key: &str) -> u64 {
        self.summary[key].as_u64().unwrap_or(0)
    }
}

#[test]
fn httpx_requests_become_http_spans_with_bodies_status_and_redacted_headers() {
    http_client_spans("httpx", false);
}

#[test]
fn requests_library_calls_become_http_spans_with_bodies_status_and_redacted_headers() {
    http_client_spans("requests", false);
}

#[test]
fn urllib3_requests_become_http_spans_with_bodies_status_and_redacted_headers() {
    http_client_spans("urllib3", false);
}

#[test]
fn aiohttp_requests_become_http_spans_with_bodies_status_and_redacted_headers() {
    http_client_spans("aiohttp", false);
}

#[test]
fn httpx_https_requests_become_https_spans_with_plaintext_bodies() {
    http_client_spans("httpx", true);
}

#[test]
fn requests_https_calls_become_https_spans_with_plaintext_bodies() {
    http_client_spans("requests", true);
}

#[test]
fn urllib3_https_requests_become_https_spans_with_plaintext_bodies() {
    http_client_spans("urllib3", true);
}

#[test]
fn aiohttp_https_requests_over_memory_bio_tls_become_https_spans() {
    http_client_spans("aiohttp", true);
}

/// curl (a C program, system libssl for HTTPS): one invocation, three requests on one
/// connection (`--next`).
fn curl_spans(tls: bool) {
    let env = TestEnv::get();
    let server = Server::http(&env, tls, 0);
    let scheme = if tls { "https" } else { "http" };
    let base = format!("{scheme}://127.0.0.1:{}", server.port);
    let body = r#"{"marker": "curl-post"}"#;
    let mut cmd: Vec<String> = vec!["curl".into(), "-s".into(), "-k".into()];
    let parts: [&[&str]; 3] = [
        &["-H", "Authorization: Bearer sk-curl-secret"],
        &[
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ],
        &[],
    ];
    let targets = [
        "/json/curl-get?q=1",
        "/echo/curl-post",
        "/status/500/curl-err",
    ];
    for (i, (extra, target)) in parts.iter().zip(targets).enumerate() {
        if i > 0 {
            cmd.push("--next".into());
            cmd.push("-k".into());
        }
        cmd.extend(["-o".to_string(), "/dev/null".to_string()]);
        cmd.extend(extra.iter().map(|s| s.to_string()));
        cmd.push(format!("{base}{target}"));
    }
    let run = trace_spans(&env, &format!("spans-curl-{scheme}"), &cmd);
    let host = format!("127.0.0.1:{}", server.port);
    let expected = vec![
        HttpExpect {
            method: "GET".into(),
            target: targets[0].into(),
            status: 200,
            request_body: None,
            response_body: Some(format!(
                r#"{{"method": "GET", "path": "{}", "body_len": 0}}"#,
                targets[0]
            )),
            request_headers: vec![
                ("authorization".into(), "[REDACTED]".into()),
                ("host".into(), host.clone()),
            ],
            response_headers: vec![("content-type".into(), "application/json".into())],
        },
        HttpExpect {
            method: "POST".into(),
            target: targets[1].into(),
            status: 200,
            request_body: Some(body.into()),
            response_body: Some(format!("echo:POST /echo/curl-post {}", body.len())),
            request_headers: vec![("content-type".into(), "application/json".into())],
            response_headers: vec![("content-length".into(), "28".into())],
        },
        HttpExpect {
            method: "GET".into(),
            target: targets[2].into(),
            status: 500,
            request_body: None,
            response_body: Some("status:500 GET /status/500/curl-err".into()),
            request_headers: vec![],
            response_headers: vec![("content-type".into(), "text/plain".into())],
        },
    ];
    let spans = run.on_port(server.port);
    assert_eq!(
        spans.len(),
        3,
        "curl made three requests:\n{}",
        run.show(&spans)
    );
    for (s, e) in spans.iter().zip(&expected) {
        check_http_span(s, scheme, server.port, e);
    }
}

#[test]
fn curl_requests_become_http_spans() {
    curl_spans(false);
}

#[test]
fn curl_https_requests_become_https_spans_from_system_libssl() {
    curl_spans(true);
}

/// Three requests written in one send before any response is read: each span pairs its
/// request with its own response (every response body names its request's path).
#[test]
fn pipelined_http_requests_pair_with_their_own_responses() {
    let env = TestEnv::get();
    let server = Server::http(&env, false, 0);
    let out = TempDir::new("http-pipeline");
    let run = trace_spans(
        &env,
        "spans-http-pipeline",
        &py(
            &env,
            "client_http_pipeline.py",
            &[server.port.to_string(), out.arg()],
        ),
    );
    let result = result_json(&out);
    let spans = run.on_port(server.port);
    assert_eq!(
        spans.len(),
        3,
        "three pipelined requests:\n{}",
        run.show(&spans)
    );
    let methods = ["GET", "POST", "GET"];
    for (i, (s, r)) in spans.iter().zip(result.as_array().unwrap()).enumerate() {
        let body = str_of(r, "body");
        // "echo:GET /pipe/one 0" / "status:404 GET /status/404/pipe-three"
        let target = body
            .split(' ')
            .find(|t| t.starts_with('/'))
            .expect("body names the path");
        expect_eq(s, "name", &s["name"], &json!(methods[i]));
        expect_eq(
            s,
            "http.target (= the path its response names)",
            attr(s, "http.target"),
            &json!(target),
        );
        expect_eq(
            s,
            "http.status_code",
            attr(s, "http.status_code"),
            &r["status"],
        );
        expect_eq(s, "response_body", &s["response_body"], &json!(body));
    }
    expect_eq(
        spans[1],
        "request_body",
        &spans[1]["request_body"],
        &json!("pipelined-body"),
    );
    expect_eq(
        spans[2],
        "status",
        &spans[2]["status"],
        &json!({"code": "ERROR", "description": "HTTP 404 Not Found"}),
    );
    for s in &spans[..2] {
        assert_eq!(status_code(s), "UNSET", "{s}");
    }
}

/// tls_server.py's `/bytes/<n>` body: a-z repeating.
fn pattern(n: usize) -> String {
    "abcdefghijklmnopqrstuvwxyz"
        .chars()
        .cycle()
        .take(n)
        .collect()
}

/// A HEAD (Content-Length but no body) and a POST answered `100 Continue` first, then
/// a 50 KiB body, on one connection, with a capture limit large enough for every call:
/// each span has its own final response, the body complete.
#[test]
fn head_100_continue_and_a_50_kib_body_on_one_connection_stay_in_step() {
    let env = TestEnv::get();
    let server = Server::http(&env, false, 0);
    let base = format!("http://127.0.0.1:{}", server.port);
    let out = TempDir::new("http-continue");
    // curl sends `Expect: 100-continue` for bodies over 1 KiB.
    let upload = "u".repeat(3000);
    fs::write(out.join("upload.txt"), &upload).unwrap();
    let mut cmd: Vec<String> = ["curl", "-s", "-o", "/dev/null", "-I"]
        .map(String::from)
        .to_vec();
    cmd.push(format!("{base}/json/head-first"));
    cmd.extend(
        [
            "--next",
            "-o",
            "/dev/null",
            "-H",
            "Content-Type: text/plain",
            "--data-binary",
        ]
        .map(String::from),
    );
    cmd.push(format!("@{}", out.join("upload.txt").display()));
    cmd.push(format!("{base}/echo/continued"));
    cmd.extend(["--next", "-o", "/dev/null"].map(String::from));
    cmd.push(format!("{base}/bytes/50000"));
    let mut args = vec![
        "--capture-limit".to_string(),
        "262144".to_string(),
        "--".to_string(),
    ];
    args.extend(cmd);
    let run = trace_spans_with(&env, "spans-http-continue", &args);
    let spans = run.on_port(server.port);
    assert_eq!(spans.len(), 3, "three requests:\n{}", run.show(&spans));
    let expected = [
        ("HEAD", "/json/head-first", None, None),
        (
            "POST",
            "/echo/continued",
            Some(upload.clone()),
            Some("echo:POST /echo/continued 3000".to_string()),
        ),
        ("GET", "/bytes/50000", None, Some(pattern(50000))),
    ];
    for (s, (method, target, req, resp)) in spans.iter().zip(expected) {
        expect_eq(s, "name", &s["name"], &json!(method));
        expect_eq(s, "http.target", attr(s, "http.target"), &json!(target));
        expect_eq(
            s,
            "http.status_code (the final response, not 100)",
            attr(s, "http.status_code"),
            &json!(200),
        );
        expect_eq(s, "request_body", &s["request_body"], &json!(req));
        // HEAD: no body although Content-Length says 55.
        expect_eq(s, "response_body", &s["response_body"], &json!(resp));
        assert_eq!(status_code(s), "UNSET", "{s}");
    }
}

/// A 100 000-byte body read in calls larger than the default 16 KiB capture limit:
/// bytes are lost, so the span's body may be cut, but what it keeps must be a true
/// prefix of the real body (never pieces from before and after a gap joined), and a
/// cut body is marked `http.response_body_truncated`.
#[test]
fn http_body_beyond_the_capture_limit_is_a_marked_prefix_never_spliced() {
    let env = TestEnv::get();
    let server = Server::http(&env, false, 0);
    let base = format!("http://127.0.0.1:{}", server.port);
    let run = trace_spans(
        &env,
        "spans-http-big-body",
        &[
            "curl".into(),
            "-s".into(),
            "-o".into(),
            "/dev/null".into(),
            format!("{base}/json/small-first"),
            "--next".into(),
            "-o".into(),
            "/dev/null".into(),
            format!("{base}/bytes/100000"),
        ],
    );
    assert!(
        run.summary["truncated_calls"].as_u64().unwrap_or(0) > 0,
        "the test needs calls beyond the capture limit: {}",
        run.summary
    );
    let spans = run.on_port(server.port);
    assert_eq!(spans.len(), 2, "two requests:\n{}", run.show(&spans));
    let s = spans[1];
    expect_eq(
        s,
        "http.target",
        attr(s, "http.target"),
        &json!("/bytes/100000"),
    );
    let body = s["response_body"].as_str().unwrap_or("");
    let full = pattern(100000);
    let at = body.bytes().zip(full.bytes()).position(|(a, b)| a != b);
    assert!(
        at.is_none() && body.len() <= full.len(),
        "response_body ({} bytes) is not a prefix of the real body: it differs at byte {at:?} \
         (bytes after a capture gap were joined to those before it): {}",
        body.len(),
        &body[at.unwrap_or(0).saturating_sub(20)..(at.unwrap_or(0) + 20).min(body.len())]
    );
    if body.len() < full.len() {
        expect_eq(
            s,
            "http.response_body_truncated",
            attr(s, "http.response_body_truncated"),
            &json!(true),
        );
    }
}

/// HTTP on port 9000 (no well-known port) is recognised from its bytes.
#[test]
fn http_on_port_9000_is_detected_by_content() {
    let env = TestEnv::get();
    let server = Server::http(&env, false, 9000);
    let run = trace_spans(
        &env,
        "spans-http-port-9000",
        &[
            "curl".into(),
            "-s".into(),
            "-o".into(),
            "/dev/null".into(),
            "http://127.0.0.1:9000/status/500/port-9000".into(),
        ],
    );
    let spans = run.on_port(9000);
    assert_eq!(spans.len(), 1, "one request:\n{}", run.show(&spans));
    check_http_span(
        spans[0],
        "http",
        server.port,
        &HttpExpect {
            method: "GET".into(),
            target: "/status/500/port-9000".into(),
            status: 500,
            request_body: None,
            response_body: Some("status:500 GET /status/500/port-9000".into()),
            request_headers: vec![],
            response_headers: vec![],
        },
    );
}

// ---------------------------------------------------------------------------------------
// SQL: PostgreSQL (psycopg2, asyncpg; plain and TLS) and MariaDB (PyMySQL)
// ---------------------------------------------------------------------------------------

struct SqlExpect<'a> {
    system: &'a str,
    port: u16,
    /// Statements the driver sends on its own (session set-up): allowed in addition.
    chatter: &'a dyn Fn(&str) -> bool,
    /// The error code of the failing statement, as the server sent it.
    error_code: Value,
}

/// The spans on the server's port are exactly the client's statements (plus allowed
/// driver chatter), in order, each with statement, operation, db.name/db.user, row
/// count, or ERROR status carrying the server's message and code.
fn check_sql_spans(run: &SpanRun, result: &Value, e: &SqlExpect) {
    let results = result.as_array().expect("result.json: a list");
    let all = run.on_port(e.port);
    let statements: Vec<&str> = results.iter().map(|r| str_of(r, "statement")).collect();
    let mut ours = Vec::new();
    for s in &all {
        expect_eq(s, "db.system", attr(s, "db.system"), &json!(e.system));
        let st = attr(s, "db.statement").as_str().unwrap_or("");
        if statements.contains(&st) {
            ours.push(*s);
        } else {
            assert!(
                (e.chatter)(st),
                "a span for a statement the client did not send: {s}\nall spans on the port:\n{}",
                run.show(&all)
            );
        }
    }
    assert_eq!(
        ours.len(),
        results.len(),
        "one span per statement, in order:\n{}",
        run.show(&all)
    );
    for (s, r) in ours.iter().zip(results) {
        let st = str_of(r, "statement");
        let op = st.split_whitespace().next().unwrap();
        expect_eq(s, "name", &s["name"], &json!(op));
        expect_eq(s, "kind", &s["kind"], &json!("CLIENT"));
        for (k, v) in [
            ("db.statement", json!(st)),
            ("db.operation", json!(op)),
            ("db.name", json!("shop")),
            ("db.user", json!("openbox")),
            ("net.peer.name", json!("127.0.0.1")),
            ("net.peer.port", json!(e.port)),
        ] {
            expect_eq(s, k, attr(s, k), &v);
        }
        if let Some(n) = r.get("rowcount") {
            expect_eq(s, "db.rowcount", attr(s, "db.rowcount"), n);
            expect_eq(
                s,
                "status",
                &s["status"],
                &json!({"code": "UNSET", "description": null}),
            );
        } else {
            let msg = str_of(r, "error_message");
            assert_eq!(status_code(s), "ERROR", "the failing statement's span: {s}");
            assert!(
                status_description(s).contains(msg),
                "status.description must carry the server's message {msg:?}: {s}"
            );
            let code = attr(s, "db.error.code");
            let ok = match &e.error_code {
                Value::Number(n) => num_or_str_eq(code, n.as_i64().unwrap()),
                other => code == other,
            };
            assert!(ok, "db.error.code must be {}: {s}", e.error_code);
        }
    }
}

fn pg_chatter(st: &str) -> bool {
    let up = st.trim_start().to_ascii_uppercase();
    ["SET ", "SHOW ", "BEGIN", "COMMIT", "ROLLBACK"]
        .iter()
        .any(|p| up.starts_with(p))
}

fn postgres_spans(lib: &str, tls: bool, port: u16) {
    let env = TestEnv::get();
    let server = Server::postgres(&env, port);
    let out = TempDir::new(&format!("pg-{lib}"));
    let mut args = vec![lib.to_string(), server.port.to_string(), out.arg()];
    if tls {
        args.push("--tls".into());
    }
    let run = trace_spans(
        &env,
        &format!(
            "spans-pg-{lib}{}-{}",
            if tls { "-tls" } else { "" },
            server.port
        ),
        &py(&env, "client_pg.py", &args),
    );
    check_sql_spans(
        &run,
        &result_json(&out),
        &SqlExpect {
            system: "postgresql",
            port: server.port,
            chatter: &pg_chatter,
            error_code: json!("42P01"),
        },
    );
}

#[test]
fn psycopg2_statements_become_postgresql_spans_with_rowcounts_and_errors() {
    postgres_spans("psycopg2", false, 0);
}

#[test]
fn psycopg2_statements_over_tls_become_postgresql_spans() {
    postgres_spans("psycopg2", true, 0);
}

#[test]
fn asyncpg_extended_protocol_statements_become_postgresql_spans() {
    postgres_spans("asyncpg", false, 0);
}

#[test]
fn asyncpg_statements_over_memory_bio_tls_become_postgresql_spans() {
    postgres_spans("asyncpg", true, 0);
}

/// PostgreSQL on 6543 (not 5432) is recognised from the startup message.
#[test]
fn postgres_on_port_6543_is_detected_by_content() {
    postgres_spans("psycopg2", false, 6543);
}

#[test]
fn pymysql_statements_become_mysql_spans_with_rowcounts_and_errors() {
    let env = TestEnv::get();
    let server = Server::mariadb(&env);
    let out = TempDir::new("mysql");
    let run = trace_spans(
        &env,
        "spans-mysql-pymysql",
        &py(
            &env,
            "client_mysql.py",
            &[server.port.to_string(), out.arg()],
        ),
    );
    let chatter = |st: &str| st.trim_start().to_ascii_uppercase().starts_with("SET ");
    check_sql_spans(
        &run,
        &result_json(&out),
        &SqlExpect {
            system: "mysql",
            port: server.port,
            chatter: &chatter,
            error_code: json!(1146),
        },
    );
}

/// A server-side cursor (COM_STMT_EXECUTE with CURSOR_TYPE_READ_ONLY, then COM_STMT_FETCH
/// until the server reports the last row), through MariaDB Connector/C (EOF packets) and
/// through a client offering CLIENT_DEPRECATE_EOF (the fetches' rows end in OK packets):
/// the execute's span has no row count (the rows come later), then one span per fetch
/// with the rows the client got from it.
fn mysql_cursor_spans(client: &str) {
    let env = TestEnv::get();
    let server = Server::mariadb(&env);
    let out = TempDir::new("mysql-cursor");
    let run = trace_spans(
        &env,
        &format!("spans-{}", client.trim_end_matches(".py")),
        &py(&env, client, &[server.port.to_string(), out.arg()]),
    );
    let result = result_json(&out);
    let fetched = result["fetched"].as_array().unwrap();
    assert_eq!(result["rows"], json!(3), "{result}");
    let all = run.on_port(server.port);
    let mut want = vec![None];
    want.extend(fetched.iter().cloned().map(Some));
    assert_eq!(
        all.len(),
        want.len(),
        "the execute, then one span per fetch:\n{}",
        run.show(&all)
    );
    for (s, rows) in all.iter().zip(&want) {
        expect_eq(s, "name", &s["name"], &json!("SELECT"));
        for (k, v) in [
            ("db.system", json!("mysql")),
            ("db.statement", result["statement"].clone()),
            ("db.operation", json!("SELECT")),
            ("db.name", json!("shop")),
            ("db.user", json!("openbox")),
            ("net.peer.port", json!(server.port)),
        ] {
            expect_eq(s, k, attr(s, k), &v);
        }
        let rowcount = rows.clone().unwrap_or(Value::Null);
        expect_eq(s, "db.rowcount", attr(s, "db.rowcount"), &rowcount);
        expect_eq(
            s,
            "status",
            &s["status"],
            &json!({"code": "UNSET", "description": null}),
        );
    }
}

#[test]
fn mariadb_connector_c_cursor_fetches_become_spans() {
    mysql_cursor_spans("client_mysql_cursor.py");
}

#[test]
fn cursor_fetches_with_deprecate_eof_become_spans() {
    mysql_cursor_spans("client_mysql_raw_cursor.py");
}

// ---------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------

/// The spans on the Redis port are the client's commands (plus redis-py's connection
/// set-up), in order, each paired with its own reply: only the command that got the
/// WRONGTYPE error is ERROR.
fn redis_spans(mode: &str) {
    let env = TestEnv::get();
    let server = Server::redis(&env);
    let out = TempDir::new(&format!("redis-{mode}"));
    let run = trace_spans(
        &env,
        &format!("spans-redis-{mode}"),
        &py(
            &env,
            "client_redis.py",
            &[mode.into(), server.port.to_string(), out.arg()],
        ),
    );
    let result = result_json(&out);
    let mut expected: Vec<Value> = result.as_array().unwrap().clone();
    if mode == "pipeline" {
        // client_redis.py connects with a PING before the pipeline.
        expected.insert(0, json!({"command": ["PING"], "reply": true}));
    }
    let all = run.on_port(server.port);
    let setup = ["CLIENT", "SELECT", "HELLO"];
    let ours: Vec<&Value> = all
        .iter()
        .copied()
        .filter(|s| !setup.contains(&str_of(s, "name")))
        .collect();
    assert_eq!(
        ours.len(),
        expected.len(),
        "one span per command:\n{}",
        run.show(&all)
    );
    for (s, e) in ours.iter().zip(&expected) {
        let args: Vec<&str> = e["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let cmd = args[0];
        expect_eq(s, "name", &s["name"], &json!(cmd));
        expect_eq(s, "kind", &s["kind"], &json!("CLIENT"));
        for (k, v) in [
            ("db.system", json!("redis")),
            ("db.operation", json!(cmd)),
            ("db.redis.database_index", json!(3)),
            ("db.redis.args_length", json!(args.len())),
            ("net.peer.name", json!("127.0.0.1")),
            ("net.peer.port", json!(server.port)),
        ] {
            expect_eq(s, k, attr(s, k), &v);
        }
        // The SDK's form ("SET ? ?") or the full command ("SET sync:marker hello").
        let st = attr(s, "db.statement").as_str().unwrap_or("");
        let sanitized = std::iter::once(cmd)
            .chain(std::iter::repeat_n("?", args.len() - 1))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            st == sanitized || st == args.join(" "),
            "db.statement must be {sanitized:?} (as the SDK) or {:?}: {s}",
            args.join(" ")
        );
        match e.get("error") {
            Some(msg) => {
                assert_eq!(status_code(s), "ERROR", "the command that got {msg}: {s}");
                assert!(
                    status_description(s).contains(msg.as_str().unwrap()),
                    "status.description must carry the server's message {msg}: {s}"
                );
            }
            None => expect_eq(
                s,
                "status",
                &s["status"],
                &json!({"code": "UNSET", "description": null}),
            ),
        }
    }
}

#[test]
fn redis_commands_become_spans_with_database_index_and_wrongtype_error() {
    redis_spans("sync");
}

#[test]
fn redis_asyncio_commands_become_spans() {
    redis_spans("asyncio");
}

#[test]
fn redis_pipeline_commands_pair_with_their_replies() {
    redis_spans("pipeline");
}

// ---------------------------------------------------------------------------------------
// MongoDB (FerretDB)
// ---------------------------------------------------------------------------------------

#[test]
fn pymongo_commands_become_mongodb_spans_with_collection_and_error() {
    let env = TestEnv::get();
    let server = Server::ferretdb(&env);
    let out = TempDir::new("mongo");
    let run = trace_spans(
        &env,
        "spans-mongo-pymongo",
        &py(
            &env,
            "client_mongo.py",
            &[server.port.to_string(), out.arg()],
        ),
    );
    let result = result_json(&out);
    let all = run.on_port(server.port);
    // pymongo's handshake and monitoring, and endSessions at close.
    let chatter = [
        "hello",
        "isMaster",
        "ismaster",
        "endSessions",
        "ping",
        "buildInfo",
    ];
    let op_of = |s: &Value| -> String {
        // "find", or the SDK's "shop.find".
        let name = str_of(s, "name");
        name.rsplit_once('.').map_or(name, |(_, op)| op).to_string()
    };
    let ours: Vec<&Value> = all
        .iter()
        .copied()
        .filter(|s| !chatter.contains(&op_of(s).as_str()))
        .collect();
    let expected = result.as_array().unwrap();
    assert_eq!(
        ours.len(),
        expected.len(),
        "one span per command:\n{}",
        run.show(&all)
    );
    let rowcounts = [1, 3, 3, 2, 1];
    for (i, (s, e)) in ours.iter().zip(expected).enumerate() {
        let op = str_of(e, "command");
        assert!(
            [op.to_string(), format!("shop.{op}")].contains(&str_of(s, "name").to_string()),
            "name must be {op:?} (or the SDK's \"shop.{op}\"): {s}"
        );
        expect_eq(s, "kind", &s["kind"], &json!("CLIENT"));
        for (k, v) in [
            ("db.system", json!("mongodb")),
            ("db.name", json!("shop")),
            ("db.operation", json!(op)),
            ("net.peer.name", json!("127.0.0.1")),
            ("net.peer.port", json!(server.port)),
        ] {
            expect_eq(s, k, attr(s, k), &v);
        }
        assert!(
            attr(s, "db.statement")
                .as_str()
                .is_some_and(|st| st.contains(op)),
            "db.statement must name the command {op}: {s}"
        );
        if let Some(code) = e.get("error_code") {
            let msg = str_of(e, "error");
            assert_eq!(status_code(s), "ERROR", "{s}");
            assert!(
                status_description(s).contains(msg),
                "status.description must carry the server's message {msg:?}: {s}"
            );
            assert!(
                num_or_str_eq(attr(s, "db.error.code"), code.as_i64().unwrap()),
                "db.error.code must be {code}: {s}"
            );
        } else {
            expect_eq(
                s,
                "db.mongodb.collection",
                attr(s, "db.mongodb.collection"),
                &json!("items_marker"),
            );
            expect_eq(
                s,
                "status",
                &s["status"],
                &json!({"code": "UNSET", "description": null}),
            );
            let rc = attr(s, "db.rowcount");
            assert!(
                rc.is_null() || rc == &json!(rowcounts[i]),
                "db.rowcount, when given, must be {}: {s}",
                rowcounts[i]
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// A result beyond the capture limit: what follows on the connection is still seen
// ---------------------------------------------------------------------------------------

/// client_bigresult.py KIND: the spans on the server's port, less connection chatter,
/// are `expected` (name, db.statement or None when the statement is not checked), all
/// without ERROR; the last one (after the 100 000-byte result) has `last_attr`.
fn big_result_spans(
    kind: &str,
    server: &Server,
    expected: &[(&str, Option<&str>)],
    last_attr: (&str, Value),
) {
    let env = TestEnv::get();
    let out = TempDir::new(&format!("big-{kind}"));
    let run = trace_spans(
        &env,
        &format!("spans-big-result-{kind}"),
        &py(
            &env,
            "client_bigresult.py",
            &[kind.into(), server.port.to_string(), out.arg()],
        ),
    );
    assert!(
        out.join("ok").is_file(),
        "client_bigresult.py failed; see {}",
        run.saved.display()
    );
    assert!(
        run.summary["truncated_calls"].as_u64().unwrap_or(0) > 0,
        "the test needs calls beyond the capture limit: {}",
        run.summary
    );
    let chatter = [
        "CLIENT",
        "HELLO",
        "SELECT_DB",
        "hello",
        "isMaster",
        "ismaster",
        "endSessions",
    ];
    let all = run.on_port(server.port);
    let ours: Vec<&Value> = all
        .iter()
        .copied()
        .filter(|s| !chatter.contains(&str_of(s, "name")))
        .filter(|s| {
            !attr(s, "db.statement")
                .as_str()
                .is_some_and(|st| st.starts_with("SET NAMES"))
        })
        .collect();
    assert_eq!(
        ours.len(),
        expected.len(),
        "every operation, also those after the big result:\n{}",
        run.show(&all)
    );
    for (s, (name, statement)) in ours.iter().zip(expected) {
        expect_eq(s, "name", &s["name"], &json!(name));
        if let Some(st) = statement {
            expect_eq(s, "db.statement", attr(s, "db.statement"), &json!(st));
        }
        assert_ne!(status_code(s), "ERROR", "{s}");
    }
    let last = ours.last().unwrap();
    expect_eq(last, last_attr.0, attr(last, last_attr.0), &last_attr.1);
}

/// client_bigresult.py repeats the big result and the small operation after it.
const ROUNDS: usize = 5;

fn rounds<'a>(
    first: (&'a str, Option<&'a str>),
    pair: [(&'a str, Option<&'a str>); 2],
) -> Vec<(&'a str, Option<&'a str>)> {
    let mut v = vec![first];
    for _ in 0..ROUNDS {
        v.extend(pair);
    }
    v
}

#[test]
fn postgres_statements_after_a_result_beyond_the_capture_limit_are_still_seen() {
    let env = TestEnv::get();
    let server = Server::postgres(&env, 0);
    big_result_spans(
        "postgres",
        &server,
        &rounds(
            ("SELECT", Some("SELECT 'before-big'")),
            [
                ("SELECT", Some("SELECT repeat('z', 100000)")),
                ("SELECT", Some("SELECT 'after-big'")),
            ],
        ),
        ("db.rowcount", json!(1)),
    );
}

#[test]
fn mysql_statements_after_a_result_beyond_the_capture_limit_are_still_seen() {
    let env = TestEnv::get();
    let server = Server::mariadb(&env);
    big_result_spans(
        "mysql",
        &server,
        &rounds(
            ("SELECT", Some("SELECT 'before-big'")),
            [
                ("SELECT", Some("SELECT REPEAT('z', 100000)")),
                ("SELECT", Some("SELECT 'after-big'")),
            ],
        ),
        ("db.rowcount", json!(1)),
    );
}

#[test]
fn redis_commands_after_a_value_beyond_the_capture_limit_stay_paired() {
    let env = TestEnv::get();
    let server = Server::redis(&env);
    big_result_spans(
        "redis",
        &server,
        &rounds(("SET", None), [("GET", None), ("GET", None)]),
        ("db.redis.args_length", json!(2)),
    );
}

#[test]
fn mongodb_commands_after_a_document_beyond_the_capture_limit_are_still_seen() {
    let env = TestEnv::get();
    let server = Server::ferretdb(&env);
    big_result_spans(
        "mongo",
        &server,
        &rounds(("insert", None), [("find", None), ("find", None)]),
        ("db.mongodb.collection", json!("big")),
    );
}

// ---------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------

#[test]
fn file_spans_have_exact_sizes_and_children_under_their_open_span() {
    let env = TestEnv::get();
    let dir = TempDir::new("span-files");
    let run = trace_spans(
        &env,
        "spans-files",
        &py(&env, "client_spanfiles.py", &[dir.arg()]),
    );
    assert!(
        dir.join("ok").is_file(),
        "client_spanfiles.py did not finish; see {}",
        run.saved.display()
    );
    let p = |name: &str| dir.join(name).display().to_string();
    const BIG: u64 = 10 * 1024 * 1024;
    // (path, mode, total read, total written, children: (op, bytes, calls or None=1))
    type Child = (&'static str, u64, Option<u64>);
    let expected: Vec<(String, &str, u64, u64, Vec<Child>)> = vec![
        (p("known.txt"), "w", 0, 3000, vec![("write", 3000, Some(2))]),
        (p("known.txt"), "r", 3000, 0, vec![("read", 3000, Some(2))]),
        (
            p("mixed.bin"),
            "r+",
            50,
            107,
            vec![
                ("write", 100, None),
                ("read", 50, Some(2)),
                ("write", 7, None),
            ],
        ),
        (p("big.bin"), "w", 0, BIG, vec![("write", BIG, None)]),
        // 2560 reads of 4 KiB, and the read that returns 0 at EOF: one child.
        (p("big.bin"), "r", BIG, 0, vec![("read", BIG, Some(0))]),
        (p("ok"), "w", 0, 0, vec![]),
    ];
    let opens = run.file_opens_under(dir.path());
    assert_eq!(
        opens.len(),
        expected.len(),
        "one file.open span per open:\n{}",
        run.show(&opens)
    );
    for (s, (path, mode, read, written, children)) in opens.iter().zip(&expected) {
        expect_eq(s, "kind", &s["kind"], &json!("INTERNAL"));
        expect_eq(s, "parent_span_id", &s["parent_span_id"], &Value::Null);
        for (k, v) in [
            ("file.path", json!(path)),
            ("file.mode", json!(mode)),
            ("file.total_bytes_read", json!(read)),
            ("file.total_bytes_written", json!(written)),
        ] {
            expect_eq(s, k, attr(s, k), &v);
        }
        let got = run.children_of(s);
        assert_eq!(
            got.len(),
            children.len(),
            "children of the file.open span of {path} ({mode}):\n{}",
            run.show(&got)
        );
        let (open_start, open_end) = (u64_of(s, "start_time"), u64_of(s, "end_time"));
        for (c, (op, bytes, calls)) in got.iter().zip(children) {
            expect_eq(c, "name", &c["name"], &json!(format!("file.{op}")));
            expect_eq(c, "kind", &c["kind"], &json!("INTERNAL"));
            expect_eq(c, "file.path", attr(c, "file.path"), &json!(path));
            expect_eq(c, "file.operation", attr(c, "file.operation"), &json!(op));
            expect_eq(c, "file.bytes", attr(c, "file.bytes"), &json!(bytes));
            match calls {
                None => expect_eq(
                    c,
                    "file.calls (one call)",
                    attr(c, "file.calls"),
                    &Value::Null,
                ),
                Some(0) => assert!(
                    attr(c, "file.calls")
                        .as_u64()
                        .is_some_and(|n| n >= BIG / 4096),
                    "file.calls must count the 2560+ coalesced reads: {c}"
                ),
                Some(n) => expect_eq(c, "file.calls", attr(c, "file.calls"), &json!(n)),
            }
            assert!(
                u64_of(c, "start_time") >= open_start && u64_of(c, "end_time") <= open_end,
                "child span outside its file.open span [{open_start}, {open_end}]: {c}"
            );
        }
    }
}

/// The agent's exit code is the traced command's; the summary still goes to stderr.
#[test]
fn exit_code_of_the_traced_command_is_passed_through() {
    let env = TestEnv::get();
    let run = trace_spans_exit(
        &env,
        "spans-exit-code",
        &["sh".into(), "-c".into(), "exit 7".into()],
        7,
    );
    assert!(
        run.summary.get("events").is_some(),
        "summary: {}",
        run.summary
    );
}

// ---------------------------------------------------------------------------------------
// Side by side with the in-process SDK
// ---------------------------------------------------------------------------------------

/// What identifies one operation in both the SDK's spans and ours.
fn op_key(s: &Value) -> Option<String> {
    let a = &s["attributes"];
    let name = str_of(s, "name");
    if let Some(m) = a["http.method"].as_str() {
        return Some(format!("http {m} {}", a["http.url"].as_str()?));
    }
    match a["db.system"].as_str() {
        Some("redis") => Some(format!(
            "redis {}",
            a["db.statement"].as_str()?.split(' ').next()?
        )),
        Some("mongodb") => Some(format!(
            "mongodb {}",
            name.rsplit_once('.').map_or(name, |(_, op)| op)
        )),
        Some(system) => Some(format!("{system} {}", a["db.statement"].as_str()?)),
        None if name.starts_with("file.") => Some(format!(
            "{name} {} {}",
            a["file.path"].as_str()?,
            a["file.mode"].as_str().unwrap_or("")
        )),
        None => None,
    }
}

/// Attributes whose values must agree (when the SDK has them).
const SAME_VALUE: &[&str] = &[
    "http.method",
    "http.url",
    "http.status_code",
    "db.system",
    "db.name",
    "db.user",
    "db.redis.database_index",
    "db.redis.args_length",
    "db.mongodb.collection",
    "net.peer.name",
    "net.peer.port",
    "file.path",
    "file.mode",
    "file.operation",
    "file.bytes",
    "file.total_bytes_read",
    "file.total_bytes_written",
];

#[test]
fn spans_carry_at_least_the_attributes_of_the_sdk_spans_for_the_same_operations() {
    let env = TestEnv::get();
    let http = Server::http(&env, false, 0);
    let pg = Server::postgres(&env, 0);
    let mysql = Server::mariadb(&env);
    let redis = Server::redis(&env);
    let mongo = Server::ferretdb(&env);
    let dir = TempDir::new("sdk-files");
    let out = TempDir::new("sdk-out");
    let sdk_json = out.join("sdk-spans.json");
    let mut cmd = vec![
        env.sdk_python().display().to_string(),
        env.script("sdk_ops.py").display().to_string(),
    ];
    for (flag, value) in [
        ("--http", format!("http://127.0.0.1:{}", http.port)),
        ("--pg", pg.port.to_string()),
        ("--mysql", mysql.port.to_string()),
        ("--redis", redis.port.to_string()),
        ("--mongo", mongo.port.to_string()),
        ("--dir", dir.arg()),
        ("--sdk", sdk_json.display().to_string()),
    ] {
        cmd.push(flag.into());
        cmd.push(value);
    }
    // One run: the SDK's instrumentation records its spans in-process while the agent
    // watches the same operations from outside.
    let run = trace_spans(&env, "spans-sdk-side-by-side", &cmd);
    let _ = fs::copy(&sdk_json, run.saved.with_extension("sdk.json"));
    let sdk: Vec<Value> = serde_json::from_str(
        &fs::read_to_string(&sdk_json).expect("sdk_ops.py wrote the SDK's spans"),
    )
    .expect("the SDK's spans are JSON");
    let dir_prefix = format!("{}/", dir.path().display());
    let sdk_ops: Vec<&Value> = sdk
        .iter()
        .filter(|s| {
            s["attributes"]["file.path"]
                .as_str()
                .is_none_or(|p| p.starts_with(&dir_prefix))
        })
        .collect();
    assert!(
        sdk_ops.len() >= 15,
        "the SDK recorded too few spans: {sdk:#?}"
    );

    let mut ours: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for s in &run.spans {
        if let Some(k) = op_key(s) {
            ours.entry(k).or_default().push(s);
        }
    }
    for v in ours.values_mut() {
        v.sort_by_key(|s| u64_of(s, "start_time"));
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut table = Vec::new();
    for s in &sdk_ops {
        let key = op_key(s).unwrap_or_else(|| panic!("an SDK span this test cannot key: {s}"));
        let n = seen.entry(key.clone()).or_default();
        let Some(a) = ours.get(&key).and_then(|v| v.get(*n)) else {
            problems.push(format!("{key}: no agent span (the SDK has {s})"));
            *n += 1;
            continue;
        };
        *n += 1;
        let sdk_keys: Vec<&String> = s["attributes"].as_object().unwrap().keys().collect();
        let our_attrs = a["attributes"].as_object().unwrap();
        let missing: Vec<&&String> = sdk_keys
            .iter()
            .filter(|k| !our_attrs.contains_key(**k))
            .collect();
        let extra: Vec<&String> = our_attrs
            .keys()
            .filter(|k| !s["attributes"].as_object().unwrap().contains_key(*k))
            .collect();
        table.push(format!("{key}: missing {missing:?}, extra {extra:?}"));
        if !missing.is_empty() {
            problems.push(format!("{key}: the agent's span lacks {missing:?}"));
        }
        for k in SAME_VALUE {
            if let (Some(v), Some(o)) = (s["attributes"].get(*k), our_attrs.get(*k)) {
                if v != o {
                    problems.push(format!(
                        "{key}: {k} is {o} in the agent's span, {v} in the SDK's"
                    ));
                }
            }
        }
        if str_of(s, "kind") != str_of(a, "kind") {
            problems.push(format!(
                "{key}: kind {} vs the SDK's {}",
                a["kind"], s["kind"]
            ));
        }
        // Network operations: the agent's span (first request byte to last response
        // byte) lies inside the SDK's (around the library call). Not files: the SDK's
        // file.write span ends before the buffered bytes reach write(2).
        if !key.starts_with("file.") {
            const SKEW: u64 = 2_000_000;
            let (ss, se) = (u64_of(s, "start_time"), u64_of(s, "end_time"));
            let (os, oe) = (u64_of(a, "start_time"), u64_of(a, "end_time"));
            if os + SKEW < ss || oe > se + SKEW {
                problems.push(format!(
                    "{key}: the agent's span [{os}, {oe}] is not inside the SDK's [{ss}, {se}] (2 ms slack)"
                ));
            }
        }
        let (sc, oc) = (status_code(s), status_code(a));
        if (sc == "ERROR") != (oc == "ERROR") {
            problems.push(format!("{key}: status {oc} vs the SDK's {sc}"));
        }
        // Bodies and headers ride at the span root. Shown, not asserted: the SDK copies
        // the activity's pending httpx bodies into every span lacking them (§3.1), so
        // its DB and file spans, and GET spans, carry bodies of other requests.
        if key.starts_with("http ") {
            let roots = [
                "request_body",
                "response_body",
                "request_headers",
                "response_headers",
            ];
            let has = |x: &Value| -> Vec<&str> {
                roots
                    .iter()
                    .copied()
                    .filter(|r| x.get(*r).is_some())
                    .collect()
            };
            table.push(format!(
                "    root fields: SDK {:?}, agent {:?}",
                has(s),
                has(a)
            ));
        }
    }
    eprintln!(
        "attribute keys, agent vs SDK, per operation:\n  {}",
        table.join("\n  ")
    );
    let sdk_lines: Vec<String> = sdk_ops
        .iter()
        .map(|s| format!("{} {} {}", s["name"], s["status"], s["attributes"]))
        .collect();
    assert!(
        problems.is_empty(),
        "the agent's spans differ from the SDK's for the same operations:\n  {}\n(agent output: {}; the SDK's spans:\n  {})",
        problems.join("\n  "),
        run.saved.display(),
        sdk_lines.join("\n  ")
    );
}
