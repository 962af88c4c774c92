//! Issue 10's redaction table over what `trace --json` prints and what `run` writes: a real HTTP client and
//! server (tests/support/client_redaction.py, redaction_server.py) and PostgreSQL
//! exchange every kind of secret the issue lists; no secret may reach stdout, and
//! everything around each secret must be byte-exact.
//!
//! Run with `cargo xtask test -p openbox-agent --test redaction`.

mod common;

use std::{
    fs,
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use serde_json::{json, Value};

fn span_for<'a>(spans: &'a [Value], target_prefix: &str) -> &'a Value {
    spans
        .iter()
        .find(|s| {
            s["attributes"]["http.target"]
                .as_str()
                .is_some_and(|t| t.starts_with(target_prefix))
        })
        .unwrap_or_else(|| panic!("no span for {target_prefix} among {spans:#?}"))
}

#[track_caller]
fn expect(s: &Value, field: &str, got: &Value, want: Value) {
    assert_eq!(*got, want, "{field} of span {s}");
}

#[test]
fn secrets_of_every_kind_never_reach_trace_output_and_the_rest_is_byte_exact() {
    let env = TestEnv::get();
    let http = Server::start(&env, "redaction_server.py", &["0".into()]);
    let pg = Server::postgres(&env, 0);
    let cmd = env.python_command(
        "client_redaction.py",
        &[&http.port.to_string(), &pg.port.to_string()],
    );
    let (status, stdout, stderr, saved) = {
        let mut args = vec!["trace".to_string(), "--json".into(), "--".into()];
        args.extend(cmd);
        run_agent(&env, "redaction", &args)
    };
    assert!(
        status.success(),
        "trace failed with {status}\nstderr:\n{stderr}"
    );
    let text = String::from_utf8_lossy(&stdout);
    for (i, line) in text.lines().enumerate() {
        assert!(
            !line.contains("S3CRET"),
            "line {} of stdout holds a secret ({}): {line}",
            i + 1,
            saved.display()
        );
    }
    let spans: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a span per line"))
        .collect();
    assert_redacted(&spans, &format!("http://127.0.0.1:{}", http.port));
}

/// The same table over what `run` writes: the activity's spans in the events file (what
/// Core gets too), and the unattributed spans file.
#[test]
fn secrets_of_every_kind_never_reach_the_run_events_and_the_rest_is_byte_exact() {
    let env = TestEnv::get();
    let http = Server::start(&env, "redaction_server.py", &["0".into()]);
    let pg = Server::postgres(&env, 0);
    let dir = TempDir::new("redaction-run");
    let socket = dir.join("agent.sock");
    let mut agent = RunningAgent::start(&env, &socket, &dir.join("agent.err"), |cmd| {
        cmd.arg("--events")
            .arg(dir.join("events.jsonl"))
            .arg("--unattributed")
            .arg(dir.join("unattributed.jsonl"));
    });
    let stderr = || agent.stderr_text();
    let mut hook = Command::new(&env.python);
    hook.arg(env.script("fake_hook.py"))
        .arg(&socket)
        .arg("command")
        .args(env.python_command(
            "client_redaction.py",
            &[&http.port.to_string(), &pg.port.to_string()],
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (status, _, err) = run_bounded(&mut hook, Duration::from_secs(120));
    assert!(status.success(), "the hook failed: {err}\n{}", stderr());
    agent.stop();

    for file in ["events.jsonl", "unattributed.jsonl", "agent.err"] {
        let text = fs::read_to_string(dir.join(file)).unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            assert!(
                !line.contains("S3CRET"),
                "line {} of {file} holds a secret: {line}",
                i + 1
            );
        }
    }
    let events: Vec<Value> = fs::read_to_string(dir.join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let done = events
        .iter()
        .find(|e| e["event_type"] == "ActivityCompleted" && e["activity_id"] == "cmd")
        .unwrap_or_else(|| panic!("no ActivityCompleted for the activity: {events:#?}"));
    let spans = done["spans"].as_array().expect("spans");
    assert_redacted(spans, &format!("http://127.0.0.1:{}", http.port));
}

/// Issue 10's table: each secret of client_redaction.py is `[REDACTED]` in `spans`, and
/// everything around it is byte-exact.
fn assert_redacted(spans: &[Value], base: &str) {
    let redacted_response_headers = |s: &Value| {
        let h = &s["response_headers"];
        expect(s, "set-cookie", &h["set-cookie"], json!("[REDACTED]"));
        expect(
            s,
            "x-upstream-token",
            &h["x-upstream-token"],
            json!("[REDACTED]"),
        );
        expect(
            s,
            "location",
            &h["location"],
            json!("/next?access_token=[REDACTED]&page=2"),
        );
        expect(s, "x-marker", &h["x-marker"], json!("visible-resp"));
    };
    // The span's target, and its URL on the server's base, as `target` (redacted).
    let expect_target = |s: &Value, target: &str| {
        let at = &s["attributes"];
        expect(s, "http.target", &at["http.target"], json!(target));
        expect(
            s,
            "http.url",
            &at["http.url"],
            json!(format!("{base}{target}")),
        );
    };
    let response_json = r#"{"access_token": "[REDACTED]", "token_type": "Bearer", "usage": {"prompt_tokens": 3, "max_tokens": 5}, "note": "visible-resp-body"}"#;

    // Headers (X-Goog-Api-Key, Private-Token, Authorization, Cookie) and ?access_token=.
    let s = span_for(spans, "/query?");
    let target = "/query?access_token=[REDACTED]&page=2";
    expect_target(s, target);
    let h = &s["request_headers"];
    for name in ["x-goog-api-key", "private-token", "authorization", "cookie"] {
        expect(s, name, &h[name], json!("[REDACTED]"));
    }
    expect(s, "x-marker", &h["x-marker"], json!("visible-req"));
    expect(
        s,
        "response_body",
        &s["response_body"],
        json!(response_json),
    );
    redacted_response_headers(s);

    // ?api_key=
    let s = span_for(spans, "/query2?");
    let target = "/query2?api_key=[REDACTED]&q=plain";
    expect_target(s, target);

    // password= in a form body, both ways (the server echoes it).
    let s = span_for(spans, "/form");
    let form = "user=ann&password=[REDACTED]&remember=1";
    expect(s, "request_body", &s["request_body"], json!(form));
    expect(s, "response_body", &s["response_body"], json!(form));
    redacted_response_headers(s);

    // token in a JSON body, nested in objects and arrays, both ways.
    let s = span_for(spans, "/json");
    let body = r#"{"user": "ann", "auth": "[REDACTED]", "items": [{"token": "[REDACTED]", "n": 1}], "max_tokens": 5}"#;
    expect(s, "request_body", &s["request_body"], json!(body));
    expect(s, "response_body", &s["response_body"], json!(body));

    // A truncated (invalid) JSON body is redacted as far as it reads.
    let s = span_for(spans, "/truncated");
    let body = r#"{"a": [1, 2], "token": "[REDACTED]"#;
    expect(s, "request_body", &s["request_body"], json!(body));
    expect(s, "response_body", &s["response_body"], json!(body));

    // PostgreSQL ALTER ROLE … PASSWORD.
    let alter = spans
        .iter()
        .find(|s| s["name"] == "ALTER")
        .unwrap_or_else(|| panic!("no ALTER span among {spans:#?}"));
    expect(
        alter,
        "db.statement",
        &alter["attributes"]["db.statement"],
        json!("ALTER ROLE openbox PASSWORD '[REDACTED]'"),
    );
}

#[test]
fn redaction_patterns_can_be_relaxed_extended_and_turned_off() {
    let env = TestEnv::get();
    let http = Server::start(&env, "redaction_server.py", &["0".into()]);
    let cmd = env.python_command("client_redaction.py", &[&http.port.to_string()]);
    let run = |name: &str, flags: &[&str]| {
        let mut args = vec!["trace".to_string(), "--json".into()];
        args.extend(flags.iter().map(|f| f.to_string()));
        args.push("--".into());
        args.extend(cmd.iter().cloned());
        let (status, stdout, stderr, _) = run_agent(&env, name, &args);
        assert!(
            status.success(),
            "trace failed with {status}\nstderr:\n{stderr}"
        );
        let spans: Vec<Value> = String::from_utf8_lossy(&stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("a span per line"))
            .collect();
        spans
    };
    let spans = run(
        "redaction-relaxed",
        &[
            "--no-redact-pattern",
            "key",
            "--redact-pattern",
            "MARKER",
            "--redact-header",
            "Private-Token",
        ],
    );
    let h = &span_for(&spans, "/query?")["request_headers"];
    assert_eq!(h["x-goog-api-key"], "S3CRET-h1", "key no longer a pattern");
    assert_eq!(h["private-token"], "[REDACTED]");
    assert_eq!(h["x-marker"], "[REDACTED]", "marker added as a pattern");
    let s = span_for(&spans, "/query2?");
    assert_eq!(
        s["attributes"]["http.target"],
        "/query2?api_key=S3CRET-q2&q=plain"
    );

    let spans = run("redaction-off", &["--no-redact"]);
    let s = span_for(&spans, "/form");
    assert_eq!(s["request_body"], "user=ann&password=S3CRET-f1&remember=1");
}
