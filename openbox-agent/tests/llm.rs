//! LLM calls as `openbox-agent trace --json` shows them: the real `openai` 3.x and
//! `anthropic` Python clients (both on httpx2, which the in-process SDK does not
//! instrument) against the fake LLM server (support/llm_server.py), answering gzip'd and
//! br JSON and streamed server-sent events. Each span must carry the decoded body and
//! the `gen_ai.*` attributes of what the client itself got (support/client_llm.py's
//! result.json).
//!
//! Run with `cargo xtask test` (it installs the clients in the test virtualenv).

mod common;

use std::fs;

use common::*;
use serde_json::{json, Value};

fn attr<'a>(s: &'a Value, key: &str) -> &'a Value {
    &s["attributes"][key]
}

#[track_caller]
fn expect(problems: &mut Vec<String>, what: &str, actual: &Value, expected: &Value) {
    if actual != expected {
        problems.push(format!("{what}: got {actual}, expected {expected}"));
    }
}

/// The span of one call of client_llm.py, checked against what the client got.
fn check_llm_span(s: &Value, r: &Value) -> Vec<String> {
    let mut p = Vec::new();
    let name = r["name"].as_str().unwrap();
    let ex = |p: &mut Vec<String>, what: &str, a: &Value, e: Value| {
        expect(p, &format!("{name}: {what}"), a, &e)
    };
    ex(&mut p, "name", &s["name"], json!("POST"));
    ex(
        &mut p,
        "http.target",
        attr(s, "http.target"),
        r["path"].clone(),
    );
    ex(
        &mut p,
        "http.status_code",
        attr(s, "http.status_code"),
        json!(200),
    );
    // Complete: a stream that reached its end event is whole even though the client
    // hangs up before the chunked terminator.
    ex(
        &mut p,
        "http.response_body_truncated",
        attr(s, "http.response_body_truncated"),
        Value::Null,
    );
    let anthropic = name.starts_with("anthropic");
    ex(
        &mut p,
        "gen_ai.operation.name",
        attr(s, "gen_ai.operation.name"),
        json!("chat"),
    );
    ex(
        &mut p,
        "gen_ai.provider.name",
        attr(s, "gen_ai.provider.name"),
        json!(if anthropic { "anthropic" } else { "openai" }),
    );
    for (key, field) in [
        ("gen_ai.request.model", "model"),
        ("gen_ai.response.model", "response_model"),
        ("gen_ai.response.id", "id"),
        ("gen_ai.usage.input_tokens", "input_tokens"),
        ("gen_ai.usage.output_tokens", "output_tokens"),
    ] {
        ex(&mut p, key, attr(s, key), r[field].clone());
    }
    ex(
        &mut p,
        "gen_ai.response.finish_reasons",
        attr(s, "gen_ai.response.finish_reasons"),
        json!([r["finish"]]),
    );
    // The API key (Authorization, or Anthropic's older x-api-key) is redacted, and no
    // header shows the secret.
    let headers = &s["request_headers"];
    let key_header = ["authorization", "x-api-key"]
        .into_iter()
        .find(|h| !headers[*h].is_null())
        .unwrap_or("authorization");
    ex(
        &mut p,
        key_header,
        &headers[key_header],
        json!("[REDACTED]"),
    );
    if headers.to_string().contains("test-secret") {
        p.push(format!(
            "{name}: a request header shows the API key: {headers}"
        ));
    }
    let coding = r["coding"].as_str().unwrap();
    let body = s["response_body"].as_str().unwrap_or("");
    let text = r["text"].as_str().unwrap();
    if r["stream"] == json!(true) {
        // The event stream as it came, and the answer reassembled from its deltas.
        if !body.starts_with("data: ") && !body.starts_with("event: ") {
            p.push(format!(
                "{name}: response_body is not the event stream: {body:?}"
            ));
        }
        let messages: Value = attr(s, "gen_ai.output.messages")
            .as_str()
            .and_then(|m| serde_json::from_str(m).ok())
            .unwrap_or(Value::Null);
        ex(
            &mut p,
            "gen_ai.output.messages text",
            &messages[0]["parts"][0]["content"],
            json!(text),
        );
    } else {
        // The decoded JSON, whatever the coding on the wire.
        let doc: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        ex(&mut p, "response_body.id", &doc["id"], r["id"].clone());
        if !body.contains(text) {
            p.push(format!(
                "{name}: response_body does not hold the answer {text:?}: {body:?}"
            ));
        }
        ex(
            &mut p,
            "http.response.body.decoded",
            attr(s, "http.response.body.decoded"),
            json!(coding),
        );
        let wire = attr(s, "http.response.body.size").as_u64().unwrap_or(0);
        if wire == 0 || wire as usize >= body.len() {
            p.push(format!(
                "{name}: http.response.body.size {wire} should be the coded size, below the decoded {}",
                body.len()
            ));
        }
    }
    p
}

/// openai 3.x and anthropic: seven calls (gzip, br, streamed; chat completions,
/// responses, messages), seven spans, each decoded and with its gen_ai attributes.
#[test]
fn openai_and_anthropic_clients_calls_become_decoded_spans_with_gen_ai_attributes() {
    let env = TestEnv::get();
    let server = Server::start(&env, "llm_server.py", &["0".into()]);
    let out = TempDir::new("llm");
    let base = format!("http://127.0.0.1:{}", server.port);
    let cmd = env.python_command("client_llm.py", &[&base, &out.arg()]);
    let run = trace_spans(&env, "llm-clients", &cmd);
    let result: Value = serde_json::from_str(
        &fs::read_to_string(out.join("result.json"))
            .expect("client_llm.py wrote no result.json: it failed (see the agent's stderr)"),
    )
    .expect("result.json is JSON");
    let calls = result.as_array().expect("a list of calls");
    assert_eq!(calls.len(), 7, "client_llm.py makes seven calls");
    let spans = run.on_port(server.port);
    assert_eq!(
        spans.len(),
        calls.len(),
        "one span per LLM call:\n{}",
        run.show(&spans)
    );
    let problems: Vec<String> = spans
        .iter()
        .zip(calls)
        .flat_map(|(s, r)| check_llm_span(s, r))
        .collect();
    assert!(
        problems.is_empty(),
        "{} problem(s) with the LLM spans:\n{}\n{}",
        problems.len(),
        problems.join("\n"),
        run.show(&spans)
    );
    // Request parameters as the clients sent them.
    let chat = spans[0];
    assert_eq!(attr(chat, "gen_ai.request.temperature"), &json!(0.25));
    assert_eq!(attr(chat, "gen_ai.request.max_tokens"), &json!(64));
    assert_eq!(attr(chat, "gen_ai.request.top_p"), &json!(0.5));
    assert_eq!(attr(spans[3], "gen_ai.request.max_tokens"), &json!(32));
    assert_eq!(attr(spans[5], "gen_ai.request.max_tokens"), &json!(50));
    assert_eq!(
        attr(spans[5], "gen_ai.request.stop_sequences"),
        &json!(["END"])
    );
}
