use std::io::Write;

use serde_json::json;

use super::*;
use crate::protocol::{http::HttpParser, Op, Parser, ParserConfig, Side};

fn attrs_of(call: &Call, req: &Value, resp: &Value) -> Map<String, Value> {
    let mut a = Map::new();
    call.request_attributes(req.to_string().as_bytes(), &mut a);
    call.response_attributes(
        Some("application/json"),
        resp.to_string().as_bytes(),
        4096,
        &mut a,
    );
    a
}

fn call(target: &str, host: &str, body: &Value) -> Call {
    recognise("POST", target, Some(host), body.to_string().as_bytes())
        .unwrap_or_else(|| panic!("{target} with {body} not recognised"))
}

#[test]
fn openai_chat_completion_request_and_response() {
    let req = json!({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o-mini",
        "temperature": 0.2, "max_tokens": 50, "top_p": 0.9, "stop": "END", "seed": 7, "n": 1});
    let resp = json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}});
    let c = call("/v1/chat/completions", "api.openai.com", &req);
    assert_eq!(c.api, Api::OpenAiChat);
    let a = attrs_of(&c, &req, &resp);
    let want = json!({
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.system": "openai",
        "gen_ai.request.model": "gpt-4o-mini", "gen_ai.request.temperature": 0.2,
        "gen_ai.request.max_tokens": 50, "gen_ai.request.top_p": 0.9,
        "gen_ai.request.stop_sequences": ["END"], "gen_ai.request.seed": 7,
        "gen_ai.response.id": "chatcmpl-1", "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.usage.input_tokens": 9, "gen_ai.usage.output_tokens": 3,
    });
    assert_eq!(Value::Object(a), want);
}

#[test]
fn any_host_serving_the_openai_paths_is_an_openai_compatible_llm() {
    let req = json!({"model": "llama3", "messages": []});
    assert_eq!(
        call("/v1/chat/completions", "127.0.0.1:8000", &req).provider,
        "openai"
    );
    assert_eq!(
        call(
            "/openai/deployments/d/chat/completions?api-version=1",
            "x.openai.azure.com",
            &req
        )
        .provider,
        "azure.ai.openai"
    );
    assert_eq!(
        call("/openai/v1/chat/completions", "api.groq.com", &req).provider,
        "groq"
    );
    // Same path, not that shape: not an LLM call. GET: never.
    assert_eq!(
        recognise("POST", "/v1/chat/completions", None, br#"{"foo": 1}"#),
        None
    );
    assert_eq!(recognise("GET", "/v1/chat/completions", None, b""), None);
    assert_eq!(
        recognise("POST", "/v1/other", None, req.to_string().as_bytes()),
        None
    );
    // A body cut at the limit does not parse: the path decides.
    assert!(recognise("POST", "/v1/chat/completions", None, br#"{"messages": [{"#).is_some());
}

#[test]
fn openai_responses_api() {
    let req =
        json!({"model": "gpt-4.1", "input": "hi", "max_output_tokens": 100, "temperature": 1.0});
    let resp = json!({"id": "resp_1", "object": "response", "model": "gpt-4.1-2025", "status": "completed",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "yo"}]}],
        "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}});
    let c = call("/v1/responses", "api.openai.com", &req);
    let a = attrs_of(&c, &req, &resp);
    assert_eq!(a["gen_ai.operation.name"], "chat");
    assert_eq!(a["gen_ai.request.max_tokens"], 100);
    assert_eq!(a["gen_ai.response.id"], "resp_1");
    assert_eq!(a["gen_ai.response.finish_reasons"], json!(["completed"]));
    assert_eq!(a["gen_ai.usage.input_tokens"], 5);
    assert_eq!(a["gen_ai.usage.output_tokens"], 2);
}

#[test]
fn anthropic_messages_count_cached_prompt_tokens_as_input() {
    let req = json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "top_k": 5,
        "stop_sequences": ["\n\nHuman:"], "messages": [{"role": "user", "content": "hi"}]});
    let resp = json!({"id": "msg_1", "type": "message", "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn",
        "usage": {"input_tokens": 10, "cache_read_input_tokens": 100, "output_tokens": 4}});
    let c = call("/v1/messages", "api.anthropic.com", &req);
    assert_eq!(c.api, Api::AnthropicMessages);
    let a = attrs_of(&c, &req, &resp);
    assert_eq!(a["gen_ai.provider.name"], "anthropic");
    assert_eq!(a["gen_ai.request.max_tokens"], 1024);
    assert_eq!(a["gen_ai.request.top_k"], 5);
    assert_eq!(a["gen_ai.request.stop_sequences"], json!(["\n\nHuman:"]));
    assert_eq!(a["gen_ai.response.finish_reasons"], json!(["end_turn"]));
    assert_eq!(a["gen_ai.usage.input_tokens"], 110);
    assert_eq!(a["gen_ai.usage.cache_read.input_tokens"], 100);
    assert_eq!(a["gen_ai.usage.output_tokens"], 4);
    // OpenAI's thread messages have no model: not an LLM call.
    assert_eq!(
        recognise(
            "POST",
            "/v1/threads/t1/messages",
            None,
            br#"{"role":"user","content":"x"}"#
        ),
        None
    );
}

#[test]
fn gemini_generate_content_names_its_model_in_the_path() {
    let req = json!({"contents": [{"parts": [{"text": "hi"}]}],
        "generationConfig": {"temperature": 0.5, "maxOutputTokens": 64, "topK": 3}});
    let resp = json!({"candidates": [{"content": {"parts": [{"text": "yo"}]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2, "thoughtsTokenCount": 5},
        "modelVersion": "gemini-2.5-flash", "responseId": "r1"});
    let c = call(
        "/v1beta/models/gemini-2.5-flash:generateContent?key=x",
        "generativelanguage.googleapis.com",
        &req,
    );
    let a = attrs_of(&c, &req, &resp);
    assert_eq!(a["gen_ai.operation.name"], "generate_content");
    assert_eq!(a["gen_ai.provider.name"], "gcp.gemini");
    assert_eq!(a["gen_ai.request.model"], "gemini-2.5-flash");
    assert_eq!(a["gen_ai.request.temperature"], 0.5);
    assert_eq!(a["gen_ai.request.max_tokens"], 64);
    assert_eq!(a["gen_ai.request.top_k"], 3);
    assert_eq!(a["gen_ai.response.finish_reasons"], json!(["STOP"]));
    assert_eq!(a["gen_ai.response.id"], "r1");
    assert_eq!(a["gen_ai.usage.output_tokens"], 7);
}

#[test]
fn ollama_chat_and_generate() {
    let req = json!({"model": "llama3.2", "messages": [], "stream": false,
        "options": {"temperature": 0.1, "num_predict": 20}});
    let resp = json!({"model": "llama3.2", "message": {"role": "assistant", "content": "hi"},
        "done": true, "done_reason": "stop", "prompt_eval_count": 26, "eval_count": 4});
    let c = call("/api/chat", "localhost:11434", &req);
    let a = attrs_of(&c, &req, &resp);
    assert_eq!(a["gen_ai.provider.name"], "ollama");
    assert_eq!(a["gen_ai.request.max_tokens"], 20);
    assert_eq!(a["gen_ai.response.finish_reasons"], json!(["stop"]));
    assert_eq!(a["gen_ai.usage.input_tokens"], 26);
    let c = call(
        "/api/generate",
        "localhost:11434",
        &json!({"model": "m", "prompt": "p"}),
    );
    assert_eq!(c.api.operation(), "text_completion");
}

fn stream_of(c: &Call, ct: &str, body: &[u8]) -> Stream {
    let mut s = c.stream(Some(ct), 4096).expect("a streaming content type");
    for piece in body.chunks(7) {
        s.feed(piece);
    }
    s
}

fn output_text(a: &Map<String, Value>) -> String {
    let m: Value = serde_json::from_str(a["gen_ai.output.messages"].as_str().unwrap()).unwrap();
    m[0]["parts"][0]["content"].as_str().unwrap().to_string()
}

const OPENAI_SSE: &str = concat!(
    "data: {\"id\":\"chatcmpl-9\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-9\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-9\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"id\":\"chatcmpl-9\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":2}}\n\n",
    "data: [DONE]\n\n",
);

#[test]
fn an_openai_stream_is_reassembled() {
    let c = call(
        "/v1/chat/completions",
        "h",
        &json!({"model": "gpt-4o", "messages": [], "stream": true}),
    );
    let s = stream_of(
        &c,
        "text/event-stream; charset=utf-8",
        OPENAI_SSE.as_bytes(),
    );
    assert!(s.done());
    let mut a = Map::new();
    s.attributes(&mut a);
    assert_eq!(output_text(&a), "Hello");
    assert_eq!(a["gen_ai.response.id"], "chatcmpl-9");
    assert_eq!(a["gen_ai.response.finish_reasons"], json!(["stop"]));
    assert_eq!(a["gen_ai.usage.input_tokens"], 8);
    assert_eq!(a["gen_ai.usage.output_tokens"], 2);
    // Without [DONE] it is not whole.
    let cut = &OPENAI_SSE[..OPENAI_SSE.find("data: [DONE]").unwrap()];
    assert!(!stream_of(&c, "text/event-stream", cut.as_bytes()).done());
}

const ANTHROPIC_SSE: &str = concat!(
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_7\",\"model\":\"claude-x\",\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: ping\ndata: {\"type\": \"ping\"}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi \"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"there\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":6}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
);

#[test]
fn an_anthropic_stream_is_reassembled_and_ends_at_message_stop() {
    let c = call(
        "/v1/messages",
        "h",
        &json!({"model": "claude-x", "messages": [], "max_tokens": 9}),
    );
    let s = stream_of(&c, "text/event-stream", ANTHROPIC_SSE.as_bytes());
    assert!(s.done());
    let mut a = Map::new();
    s.attributes(&mut a);
    assert_eq!(output_text(&a), "Hi there");
    assert_eq!(a["gen_ai.response.id"], "msg_7");
    assert_eq!(a["gen_ai.response.finish_reasons"], json!(["end_turn"]));
    assert_eq!(a["gen_ai.usage.input_tokens"], 12);
    assert_eq!(a["gen_ai.usage.output_tokens"], 6);
}

#[test]
fn a_responses_api_stream_ends_at_response_completed() {
    let body = concat!(
        "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_2\",\"model\":\"gpt-4.1\",\"status\":\"in_progress\"}}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"ok\"}\n\n",
        "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_2\",\"model\":\"gpt-4.1\",\"status\":\"completed\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n",
    );
    let c = call(
        "/v1/responses",
        "h",
        &json!({"model": "gpt-4.1", "input": "x", "stream": true}),
    );
    let s = stream_of(&c, "text/event-stream", body.as_bytes());
    assert!(s.done());
    let mut a = Map::new();
    s.attributes(&mut a);
    assert_eq!(output_text(&a), "ok");
    assert_eq!(a["gen_ai.usage.output_tokens"], 1);
    assert_eq!(a["gen_ai.response.finish_reasons"], json!(["completed"]));
}

#[test]
fn an_ollama_json_lines_stream_ends_at_done() {
    let body = concat!(
        "{\"model\":\"llama3\",\"message\":{\"role\":\"assistant\",\"content\":\"a\"},\"done\":false}\n",
        "{\"model\":\"llama3\",\"message\":{\"role\":\"assistant\",\"content\":\"b\"},\"done\":false}\n",
        "{\"model\":\"llama3\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"done_reason\":\"stop\",\"prompt_eval_count\":5,\"eval_count\":2}\n",
    );
    let c = call(
        "/api/chat",
        "h",
        &json!({"model": "llama3", "messages": []}),
    );
    let s = stream_of(&c, "application/x-ndjson", body.as_bytes());
    assert!(s.done());
    let mut a = Map::new();
    s.attributes(&mut a);
    assert_eq!(output_text(&a), "ab");
    assert_eq!(a["gen_ai.usage.output_tokens"], 2);
}

#[test]
fn reassembled_text_is_kept_within_the_limit_on_a_char_boundary() {
    let c = call(
        "/v1/chat/completions",
        "h",
        &json!({"model": "m", "messages": []}),
    );
    let mut s = c.stream(Some("text/event-stream"), 10).unwrap();
    for _ in 0..100 {
        s.feed(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"héllo\"}}]}\n\n".as_bytes(),
        );
    }
    s.feed(b"data: [DONE]\n\n");
    let mut a = Map::new();
    s.attributes(&mut a);
    let text = output_text(&a);
    assert!(text.len() <= 10 && text.starts_with("héllo"), "{text:?}");
    assert_eq!(a["gen_ai.output.messages_truncated"], true);
    assert!(s.done());
}

// --- Through the HTTP parser ------------------------------------------------------------

fn parse(pieces: &[(Side, &[u8])], close: bool) -> Vec<Op> {
    let mut p = HttpParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (i, (side, data)) in pieces.iter().enumerate() {
        p.feed(*side, data, i as u64 + 1, &mut out);
    }
    if close {
        p.close(1000, &mut out);
    }
    assert_eq!(p.unparsed(), 0);
    out
}

fn chunk(data: &[u8]) -> Vec<u8> {
    [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat()
}

const CHAT_REQ: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\nContent-Length: 62\r\n\r\n{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"model\":\"gpt-4o\"}";

/// openai 3.x reads up to `data: [DONE]` and closes the connection without reading the
/// chunked body's terminator: the exchange is complete, and its op is out as soon as the
/// end event arrived, not at close.
#[test]
fn a_stream_that_reached_done_is_complete_without_the_chunked_terminator() {
    let head =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
    let events: Vec<u8> = OPENAI_SSE
        .split_inclusive("\n\n")
        .flat_map(|e| chunk(e.as_bytes()))
        .collect();
    let ops = parse(
        &[
            (Side::Client, CHAT_REQ),
            (Side::Server, head),
            (Side::Server, &events),
        ],
        false,
    );
    assert_eq!(
        ops.len(),
        1,
        "the op must not wait for the terminator or the close"
    );
    let op = &ops[0];
    assert_eq!(op.attributes["gen_ai.response.id"], "chatcmpl-9", "{op:?}");
    assert!(
        op.attributes.get("http.response_body_truncated").is_none(),
        "{op:?}"
    );
    assert_eq!(op.attributes["gen_ai.usage.output_tokens"], 2);
    assert_eq!(op.attributes["gen_ai.request.model"], "gpt-4o");
    assert_eq!(op.response_body.as_deref(), Some(OPENAI_SSE.as_bytes()));
    // The terminator, if it comes, and a next exchange on the connection parse as usual.
    let mut p = HttpParser::new(ParserConfig::default());
    let mut out = Vec::new();
    for (side, data) in [
        (Side::Client, CHAT_REQ),
        (Side::Server, &head[..]),
        (Side::Server, &events),
        (Side::Server, b"0\r\n\r\n"),
        (Side::Client, CHAT_REQ),
        (
            Side::Server,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        ),
    ] {
        p.feed(side, data, 1, &mut out);
    }
    assert_eq!(out.len(), 2);
    assert_eq!(out[1].response_body.as_deref(), Some(&b"{}"[..]));
    assert_eq!(p.unparsed(), 0);
}

#[test]
fn a_stream_cut_before_its_end_event_is_marked_truncated_at_close() {
    let head =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
    let first = chunk(
        OPENAI_SSE
            .split_inclusive("\n\n")
            .next()
            .unwrap()
            .as_bytes(),
    );
    let ops = parse(
        &[
            (Side::Client, CHAT_REQ),
            (Side::Server, head),
            (Side::Server, &first),
        ],
        true,
    );
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].attributes["http.response_body_truncated"], true);
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn a_gzip_llm_answer_is_decoded_and_read() {
    let json = br#"{"id":"chatcmpl-2","model":"gpt-4o","choices":[{"index":0,"message":{"content":"hi"},"finish_reason":"length"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
    let coded = gzip(json);
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        coded.len()
    );
    let ops = parse(
        &[
            (Side::Client, CHAT_REQ),
            (Side::Server, head.as_bytes()),
            (Side::Server, &coded),
        ],
        true,
    );
    let op = &ops[0];
    assert_eq!(op.response_body.as_deref(), Some(&json[..]));
    assert_eq!(op.attributes["http.response.body.decoded"], "gzip");
    assert_eq!(op.attributes["http.response.body.size"], coded.len());
    assert_eq!(
        op.attributes["gen_ai.response.finish_reasons"],
        json!(["length"])
    );
    assert!(op.attributes.get("http.response_body_truncated").is_none());
}

#[test]
fn a_gzip_request_body_is_decoded_too() {
    let json = br#"{"model":"claude-x","max_tokens":5,"messages":[]}"#;
    let coded = gzip(json);
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: h\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        coded.len()
    );
    let ops = parse(
        &[
            (Side::Client, head.as_bytes()),
            (Side::Client, &coded),
            (Side::Server, b"HTTP/1.1 204 No Content\r\n\r\n"),
        ],
        true,
    );
    let op = &ops[0];
    assert_eq!(op.request_body.as_deref(), Some(&json[..]));
    assert_eq!(op.attributes["http.request.body.decoded"], "gzip");
    assert_eq!(op.attributes["gen_ai.provider.name"], "anthropic");
    assert_eq!(op.attributes["gen_ai.request.max_tokens"], 5);
}

/// A gzip'd event stream cannot be read as it arrives: it is decoded and replayed once
/// the body is whole.
#[test]
fn a_compressed_event_stream_is_replayed_once_decoded() {
    let coded = gzip(ANTHROPIC_SSE.as_bytes());
    let req = br#"{"model":"claude-x","max_tokens":5,"messages":[],"stream":true}"#;
    let req = [
        format!(
            "POST /v1/messages HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n",
            req.len()
        )
        .as_bytes(),
        req,
    ]
    .concat();
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        coded.len()
    );
    let ops = parse(
        &[
            (Side::Client, &req),
            (Side::Server, head.as_bytes()),
            (Side::Server, &coded),
        ],
        true,
    );
    let op = &ops[0];
    assert_eq!(op.response_body.as_deref(), Some(ANTHROPIC_SSE.as_bytes()));
    assert_eq!(op.attributes["gen_ai.usage.output_tokens"], 6);
    assert_eq!(output_text(&op.attributes), "Hi there");
}
