//! LLM calls in ActivityCompleted: a real Temporal dev server, a real Python worker with
//! the hook (support/gov_worker.py's `gov_llm`), the agent daemon reporting to the fake
//! OpenBox Core. The activity calls the fake LLM server (openbox-agent/tests/support/
//! llm_server.py) with the real `openai` 3.x and `anthropic` clients, both on httpx2,
//! which the in-process SDK does not instrument: the agent's spans are the only record.
//!
//! Every test leaves its processes' output and the Core recording in
//! `target/e2e-runs/<test name>/`.

use std::time::Duration;

use openbox_e2e::{start_llm, GovWorld};
use serde_json::{json, Value};

const RUN_TIMEOUT: Duration = Duration::from_secs(90);
const EVALUATE: &str = "/api/v1/governance/evaluate";

fn attr<'a>(s: &'a Value, k: &str) -> &'a Value {
    &s["attributes"][k]
}

/// What the span of one call must say, from what the client got (`got`).
fn problems_of(what: &str, s: &Value, got: &Value, provider: &str, model: &str) -> Vec<String> {
    let mut p = Vec::new();
    let mut want = |k: &str, v: Value| {
        if attr(s, k) != &v {
            p.push(format!("{what}: {k} is {}, expected {v}", attr(s, k)));
        }
    };
    want("gen_ai.operation.name", json!("chat"));
    want("gen_ai.provider.name", json!(provider));
    want("gen_ai.request.model", json!(model));
    want("gen_ai.response.model", got["model"].clone());
    want("gen_ai.response.id", got["id"].clone());
    want("gen_ai.response.finish_reasons", json!([got["finish"]]));
    want("gen_ai.usage.input_tokens", got["input_tokens"].clone());
    want("gen_ai.usage.output_tokens", got["output_tokens"].clone());
    want("http.response_body_truncated", Value::Null);
    p
}

/// An activity's gzip'd OpenAI chat completion and streamed Anthropic message reach Core
/// in its ActivityCompleted: the decoded response body and the gen_ai.* attributes
/// of what the clients got.
#[test]
fn llm_calls_reach_core_decoded_with_gen_ai_attributes() {
    let name = "llm_calls_reach_core_decoded_with_gen_ai_attributes";
    let mut w = GovWorld::new(name);
    let (_llm, llm_port) = start_llm(&w.env, &w.logs);
    w.start_core(&json!({"default": {"verdict": "allow"}}));
    let mut args = w.core().agent_args();
    args.extend(["--spool-dir".into(), w.spool_dir().display().to_string()]);
    w.start_agent(&args);
    w.start_worker();
    let wf = w.workflow_id(0);
    let marker = w.marker(0);
    let llm_base = format!("http://127.0.0.1:{llm_port}");
    let arg = json!({"marker": marker, "llm_base": llm_base});
    let plan = json!({"id": wf, "workflow": "GovSteps", "arg": {
        "steps": [{"activity": "gov_llm", "args": [arg], "activity_id": marker}],
        "max_attempts": 1}});
    let outcomes = w.run(&[plan], RUN_TIMEOUT);
    let o = outcomes
        .iter()
        .find(|o| o["id"] == json!(wf))
        .expect("an outcome for the workflow");
    assert_eq!(o["ok"], json!(true), "the workflow failed: {o}");
    let got = &o["result"][0];
    w.core()
        .wait_for("WorkflowCompleted", Duration::from_secs(20), |reqs| {
            reqs.iter().any(|r| {
                r["body"]["event_type"] == json!("WorkflowCompleted")
                    && r["body"]["workflow_id"] == json!(wf)
            })
        });
    let env = w.env.clone();
    let schema = w.core().validate_schema(&env);
    let reqs = w.core().requests();
    let record = w.core().record.clone();
    let (_, agent) = w.finish();
    agent.expect("the agent ran").assert_clean_exit();

    if let Err(out) = schema {
        panic!("the requests Core got do not match the JSON Schema:\n{out}");
    }
    let completed: Vec<&Value> = reqs
        .iter()
        .filter(|r| r["path"] == json!(EVALUATE))
        .map(|r| &r["body"])
        .filter(|b| {
            b["event_type"] == json!("ActivityCompleted") && b["activity_id"] == json!(marker)
        })
        .collect();
    assert_eq!(
        completed.len(),
        1,
        "one ActivityCompleted for {marker} (recorded in {})",
        record.display()
    );
    let llm_spans: Vec<&Value> = completed[0]["spans"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| {
            attr(s, "http.url")
                .as_str()
                .is_some_and(|u| u.starts_with(&llm_base))
        })
        .collect();
    let show = || {
        llm_spans
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        llm_spans.len(),
        2,
        "ActivityCompleted {marker} must hold the two LLM calls' spans:\n{}",
        show()
    );
    let by_target = |t: &str| {
        llm_spans
            .iter()
            .find(|s| attr(s, "http.target") == &json!(t))
            .copied()
            .unwrap_or_else(|| panic!("no span of POST {t}:\n{}", show()))
    };
    let chat = by_target("/gzip/v1/chat/completions");
    let stream = by_target("/identity/v1/messages");
    let mut problems = problems_of("chat", chat, &got["chat"], "openai", "gpt-e2e");
    problems.extend(problems_of(
        "stream",
        stream,
        &got["stream"],
        "anthropic",
        "claude-e2e",
    ));
    if attr(chat, "gen_ai.request.max_tokens") != &json!(20)
        || attr(chat, "gen_ai.request.temperature") != &json!(0.5)
    {
        problems.push(format!("chat: request parameters: {}", chat["attributes"]));
    }
    // The gzip'd answer as text, as the client read it.
    let body: Value = chat["response_body"]
        .as_str()
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    if body["choices"][0]["message"]["content"] != got["chat"]["text"] {
        problems.push(format!(
            "chat: response_body {} does not hold the answer {}",
            chat["response_body"], got["chat"]["text"]
        ));
    }
    if attr(chat, "http.response.body.decoded") != &json!("gzip") {
        problems.push(format!(
            "chat: http.response.body.decoded is {}",
            attr(chat, "http.response.body.decoded")
        ));
    }
    // The streamed answer reassembled from its events.
    let messages: Value = attr(stream, "gen_ai.output.messages")
        .as_str()
        .and_then(|m| serde_json::from_str(m).ok())
        .unwrap_or(Value::Null);
    if messages[0]["parts"][0]["content"] != got["stream"]["text"] {
        problems.push(format!(
            "stream: gen_ai.output.messages {} does not hold the answer {}",
            attr(stream, "gen_ai.output.messages"),
            got["stream"]["text"]
        ));
    }
    // The API keys never reach Core.
    for s in &llm_spans {
        if s.to_string().contains("e2e-secret") {
            problems.push(format!("a span shows an API key: {s}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) with the LLM spans Core got (recorded in {}):\n{}\n{}",
        problems.len(),
        record.display(),
        problems.join("\n"),
        show()
    );
}
