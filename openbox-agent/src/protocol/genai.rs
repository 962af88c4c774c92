//! LLM calls recognised in HTTP exchanges: the OpenTelemetry GenAI attributes
//! (`gen_ai.operation.name`, `gen_ai.provider.name`, `gen_ai.request.*`,
//! `gen_ai.response.*`, `gen_ai.usage.*`) from the request and response bodies of the
//! common APIs — OpenAI chat completions, completions, embeddings and responses (and
//! every server that offers the same paths: vLLM, llama.cpp, LiteLLM, Ollama's `/v1`,
//! Azure, Groq …), Anthropic messages, Gemini `generateContent`, Ollama `/api/chat` and
//! `/api/generate`.
//!
//! Recognition is by path and body shape, never by host alone: a local server that
//! answers `/v1/chat/completions` is an OpenAI-compatible LLM. The host only names the
//! provider when it is a known one. Streamed answers (server-sent events, JSON lines)
//! are reassembled by [`Stream`] as the bytes arrive: text within the body limit, usage
//! and finish reasons from the final events, and whether the stream reached its end
//! event (`data: [DONE]`, Anthropic's `message_stop`, `response.completed`, Ollama's
//! `"done": true`).

use serde_json::{json, Map, Value};

use super::http::events::{self, Format};

/// Longest stream event read: the responses API's `response.completed` repeats the whole
/// answer, so an event can be longer than the body limit; as much as the parser may
/// buffer of one message (`ParserConfig::max_buffer`'s default).
const MAX_EVENT: usize = 1 << 20;

/// The API a request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAiChat,
    OpenAiCompletions,
    OpenAiEmbeddings,
    OpenAiResponses,
    AnthropicMessages,
    Gemini,
    OllamaChat,
    OllamaGenerate,
}

impl Api {
    fn operation(self) -> &'static str {
        match self {
            Api::OpenAiChat | Api::OpenAiResponses | Api::AnthropicMessages | Api::OllamaChat => {
                "chat"
            }
            Api::OpenAiCompletions | Api::OllamaGenerate => "text_completion",
            Api::OpenAiEmbeddings => "embeddings",
            Api::Gemini => "generate_content",
        }
    }
}

/// A recognised LLM request.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub api: Api,
    pub provider: &'static str,
    /// Gemini names the model in the path (`models/gemini-2.5-flash:generateContent`).
    path_model: Option<String>,
}

/// The LLM call this HTTP request makes, if it is one.
pub fn recognise(method: &str, target: &str, host: Option<&str>, body: &[u8]) -> Option<Call> {
    if method != "POST" {
        return None;
    }
    let path = path_of(target);
    let host = host.unwrap_or("").to_ascii_lowercase();
    // A body cut at the limit does not parse: then the path alone decides. Parsed only
    // once a path is an LLM API's: every other POST would pay for a parse it never uses.
    let parsed: std::cell::OnceCell<Option<Map<String, Value>>> = std::cell::OnceCell::new();
    let doc = || parsed.get_or_init(|| serde_json::from_slice(body).ok());
    let has = |k: &str| doc().as_ref().is_none_or(|d| d.contains_key(k));
    let openai = |api| Call {
        api,
        provider: openai_compatible_provider(&host),
        path_model: None,
    };
    // Both Gemini methods follow a colon, which other paths seldom hold: a byte scan
    // spares them two substring searches.
    let gemini = if path.as_bytes().contains(&b':') {
        path.find(":generateContent")
            .or(path.find(":streamGenerateContent"))
    } else {
        None
    };
    if let Some(i) = gemini {
        let model = path[..i].rsplit('/').next().unwrap_or("").to_string();
        let provider = if host.contains("aiplatform") || path.contains("/publishers/google/") {
            "gcp.vertex_ai"
        } else {
            "gcp.gemini"
        };
        return has("contents").then(|| Call {
            api: Api::Gemini,
            provider,
            path_model: (!model.is_empty()).then_some(model),
        });
    }
    if path.ends_with("/chat/completions") {
        return has("messages").then(|| openai(Api::OpenAiChat));
    }
    if path.ends_with("/completions") {
        return has("prompt").then(|| openai(Api::OpenAiCompletions));
    }
    if path.ends_with("/embeddings") {
        return has("input").then(|| openai(Api::OpenAiEmbeddings));
    }
    if path.ends_with("/responses") {
        return (has("input") && has("model")).then(|| openai(Api::OpenAiResponses));
    }
    if path.ends_with("/api/chat") {
        return (has("messages") && has("model")).then_some(Call {
            api: Api::OllamaChat,
            provider: "ollama",
            path_model: None,
        });
    }
    if path.ends_with("/api/generate") {
        return has("model").then_some(Call {
            api: Api::OllamaGenerate,
            provider: "ollama",
            path_model: None,
        });
    }
    // Anthropic's `/v1/messages`; other `…/messages` paths (OpenAI's threads) carry no
    // model, so the body's shape tells them apart.
    if path.ends_with("/v1/messages")
        || path.ends_with("/messages") && doc().is_some() && has("model") && has("messages")
    {
        return (has("messages") && has("model")).then_some(Call {
            api: Api::AnthropicMessages,
            provider: if host.contains("bedrock") {
                "aws.bedrock"
            } else {
                "anthropic"
            },
            path_model: None,
        });
    }
    None
}

/// The path of a request target (origin or absolute form), without the query.
fn path_of(target: &str) -> &str {
    let t = match target.find("://") {
        Some(i) => {
            let rest = &target[i + 3..];
            rest.find('/').map_or("/", |j| &rest[j..])
        }
        None => target,
    };
    t.split(['?', '#']).next().unwrap_or(t)
}

/// OpenAI's API is spoken by many providers; their well-known hosts name them, any
/// other host (a local vLLM, llama.cpp or LiteLLM) is reported as `openai`, the API it
/// implements.
fn openai_compatible_provider(host: &str) -> &'static str {
    let host = host.split(':').next().unwrap_or("");
    const KNOWN: [(&str, &str); 9] = [
        (".openai.azure.com", "azure.ai.openai"),
        ("api.deepseek.com", "deepseek"),
        ("api.groq.com", "groq"),
        ("api.mistral.ai", "mistral_ai"),
        ("api.x.ai", "x_ai"),
        ("api.perplexity.ai", "perplexity"),
        ("generativelanguage.googleapis.com", "gcp.gemini"),
        ("api.anthropic.com", "anthropic"),
        ("openrouter.ai", "openrouter"),
    ];
    KNOWN
        .iter()
        .find(|(suffix, _)| host == suffix.trim_start_matches('.') || host.ends_with(suffix))
        .map_or("openai", |(_, p)| p)
}

fn put(attrs: &mut Map<String, Value>, key: &str, v: Option<&Value>) {
    if let Some(v) = v.filter(|v| !v.is_null()) {
        attrs.insert(key.to_string(), v.clone());
    }
}

fn put_str(attrs: &mut Map<String, Value>, key: &str, v: Option<&Value>) {
    if let Some(s) = v.and_then(Value::as_str).filter(|s| !s.is_empty()) {
        attrs.insert(key.to_string(), s.into());
    }
}

/// `stop` is a string or a list of strings; the attribute is always a list.
fn put_list(attrs: &mut Map<String, Value>, key: &str, v: Option<&Value>) {
    match v {
        Some(Value::String(s)) => {
            attrs.insert(key.to_string(), json!([s]));
        }
        Some(Value::Array(a)) if !a.is_empty() => {
            attrs.insert(key.to_string(), Value::Array(a.clone()));
        }
        _ => {}
    }
}

impl Call {
    /// The request's attributes: operation, provider, model and sampling parameters.
    pub fn request_attributes(&self, body: &[u8], attrs: &mut Map<String, Value>) {
        attrs.insert("gen_ai.operation.name".into(), self.api.operation().into());
        attrs.insert("gen_ai.provider.name".into(), self.provider.into());
        // The name before semantic conventions 1.37; backends that have not moved on
        // still group LLM spans by it.
        attrs.insert("gen_ai.system".into(), self.provider.into());
        if let Some(m) = &self.path_model {
            attrs.insert("gen_ai.request.model".into(), m.as_str().into());
        }
        let Ok(Value::Object(d)) = serde_json::from_slice::<Value>(body) else {
            return;
        };
        put_str(attrs, "gen_ai.request.model", d.get("model"));
        let (params, names): (&Map<String, Value>, [&str; 9]) = match self.api {
            Api::Gemini => (
                d.get("generationConfig")
                    .and_then(Value::as_object)
                    .unwrap_or(&d),
                [
                    "temperature",
                    "topP",
                    "topK",
                    "maxOutputTokens",
                    "stopSequences",
                    "seed",
                    "frequencyPenalty",
                    "presencePenalty",
                    "candidateCount",
                ],
            ),
            Api::OllamaChat | Api::OllamaGenerate => (
                d.get("options").and_then(Value::as_object).unwrap_or(&d),
                [
                    "temperature",
                    "top_p",
                    "top_k",
                    "num_predict",
                    "stop",
                    "seed",
                    "frequency_penalty",
                    "presence_penalty",
                    "",
                ],
            ),
            Api::AnthropicMessages => (
                &d,
                [
                    "temperature",
                    "top_p",
                    "top_k",
                    "max_tokens",
                    "stop_sequences",
                    "",
                    "",
                    "",
                    "",
                ],
            ),
            Api::OpenAiResponses => (
                &d,
                [
                    "temperature",
                    "top_p",
                    "",
                    "max_output_tokens",
                    "",
                    "",
                    "",
                    "",
                    "",
                ],
            ),
            _ => (
                &d,
                [
                    "temperature",
                    "top_p",
                    "top_k",
                    if d.contains_key("max_completion_tokens") {
                        "max_completion_tokens"
                    } else {
                        "max_tokens"
                    },
                    "stop",
                    "seed",
                    "frequency_penalty",
                    "presence_penalty",
                    "n",
                ],
            ),
        };
        let keys = [
            "gen_ai.request.temperature",
            "gen_ai.request.top_p",
            "gen_ai.request.top_k",
            "gen_ai.request.max_tokens",
            "gen_ai.request.stop_sequences",
            "gen_ai.request.seed",
            "gen_ai.request.frequency_penalty",
            "gen_ai.request.presence_penalty",
            "gen_ai.request.choice.count",
        ];
        for (key, name) in keys.iter().zip(names) {
            if name.is_empty() {
                continue;
            }
            let v = params.get(name);
            match *key {
                "gen_ai.request.stop_sequences" => put_list(attrs, key, v),
                // Only a count other than one says something (semantic conventions).
                "gen_ai.request.choice.count" if v.and_then(Value::as_u64) == Some(1) => {}
                _ if v.is_some_and(|v| v.is_number()) => put(attrs, key, v),
                _ => {}
            }
        }
        if self.api == Api::OpenAiEmbeddings {
            if let Some(f) = d.get("encoding_format").and_then(Value::as_str) {
                attrs.insert("gen_ai.request.encoding_formats".into(), json!([f]));
            }
        }
    }

    /// A streaming reader for this call's response, when its content type is a stream.
    pub fn stream(&self, content_type: Option<&str>, max_text: usize) -> Option<Stream> {
        let format = Format::of(content_type)?;
        Some(Stream {
            api: self.api,
            reader: events::Reader::new(format, MAX_EVENT),
            text: String::new(),
            max_text,
            text_cut: false,
            reply: Reply::default(),
            done: false,
        })
    }

    /// The attributes of a whole (non-streamed) response body; a body that is an event
    /// stream after all (a compressed one, read only once decoded) is replayed.
    pub fn response_attributes(
        &self,
        content_type: Option<&str>,
        body: &[u8],
        max_text: usize,
        attrs: &mut Map<String, Value>,
    ) {
        if let Some(mut s) = self.stream(content_type, max_text) {
            s.feed(body);
            s.attributes(attrs);
            return;
        }
        let mut reply = Reply::default();
        match serde_json::from_slice::<Value>(body) {
            // Gemini's streamGenerateContent without `alt=sse`: one JSON array of chunks.
            Ok(Value::Array(chunks)) => {
                for c in &chunks {
                    reply.gemini(c, &mut |_| {});
                }
            }
            Ok(doc) => reply.whole(self.api, &doc),
            Err(_) => return,
        }
        reply.attributes(attrs);
    }
}

/// What the response said, whole or gathered from its events.
#[derive(Debug, Default, Clone, PartialEq)]
struct Reply {
    id: Option<String>,
    model: Option<String>,
    finish_reasons: Vec<String>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read: Option<u64>,
    cache_creation: Option<u64>,
}

fn s(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn n(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

impl Reply {
    fn set_id_model(&mut self, v: &Value) {
        self.id = s(v, "id").or(self.id.take());
        self.model = s(v, "model").or(self.model.take());
    }

    fn finish(&mut self, reason: Option<String>) {
        if let Some(r) = reason {
            self.finish_reasons.push(r);
        }
    }

    /// OpenAI chat, completions and embeddings usage.
    fn openai_usage(&mut self, u: &Value) {
        if u.is_object() {
            self.input_tokens = n(u, "prompt_tokens").or(self.input_tokens);
            self.output_tokens = n(u, "completion_tokens").or(self.output_tokens);
            self.cache_read = u
                .pointer("/prompt_tokens_details/cached_tokens")
                .and_then(Value::as_u64)
                .or(self.cache_read);
        }
    }

    /// A responses-API `response` object.
    fn openai_response(&mut self, r: &Value) {
        self.set_id_model(r);
        if let Some(u) = r.get("usage").filter(|u| u.is_object()) {
            self.input_tokens = n(u, "input_tokens").or(self.input_tokens);
            self.output_tokens = n(u, "output_tokens").or(self.output_tokens);
            self.cache_read = u
                .pointer("/input_tokens_details/cached_tokens")
                .and_then(Value::as_u64)
                .or(self.cache_read);
        }
        let reason = r
            .pointer("/incomplete_details/reason")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| s(r, "status"));
        if let Some(reason) = reason {
            self.finish_reasons = vec![reason];
        }
    }

    /// Anthropic usage: `input_tokens` excludes cached prompt tokens, which the
    /// conventions count as input.
    fn anthropic_usage(&mut self, u: &Value) {
        if !u.is_object() {
            return;
        }
        self.cache_read = n(u, "cache_read_input_tokens").or(self.cache_read);
        self.cache_creation = n(u, "cache_creation_input_tokens").or(self.cache_creation);
        if let Some(i) = n(u, "input_tokens") {
            self.input_tokens =
                Some(i + self.cache_read.unwrap_or(0) + self.cache_creation.unwrap_or(0));
        }
        self.output_tokens = n(u, "output_tokens").or(self.output_tokens);
    }

    /// One Gemini response or stream chunk; `text` receives its parts' text.
    fn gemini(&mut self, c: &Value, text: &mut dyn FnMut(&str)) {
        self.id = s(c, "responseId").or(self.id.take());
        self.model = s(c, "modelVersion").or(self.model.take());
        for cand in c
            .get("candidates")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(parts) = cand.pointer("/content/parts").and_then(Value::as_array) {
                for p in parts {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        text(t);
                    }
                }
            }
            self.finish(s(cand, "finishReason"));
        }
        if let Some(u) = c.get("usageMetadata") {
            self.input_tokens = n(u, "promptTokenCount").or(self.input_tokens);
            let out =
                n(u, "candidatesTokenCount").map(|o| o + n(u, "thoughtsTokenCount").unwrap_or(0));
            self.output_tokens = out.or(self.output_tokens);
            self.cache_read = n(u, "cachedContentTokenCount").or(self.cache_read);
        }
    }

    /// One Ollama answer or stream line.
    fn ollama(&mut self, v: &Value) {
        self.model = s(v, "model").or(self.model.take());
        if v.get("done").and_then(Value::as_bool) == Some(true) {
            self.finish(s(v, "done_reason"));
            self.input_tokens = n(v, "prompt_eval_count").or(self.input_tokens);
            self.output_tokens = n(v, "eval_count").or(self.output_tokens);
        }
    }

    fn whole(&mut self, api: Api, d: &Value) {
        match api {
            Api::OpenAiChat | Api::OpenAiCompletions | Api::OpenAiEmbeddings => {
                self.set_id_model(d);
                for c in d
                    .get("choices")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    self.finish(s(c, "finish_reason"));
                }
                if let Some(u) = d.get("usage") {
                    self.openai_usage(u);
                }
            }
            Api::OpenAiResponses => self.openai_response(d),
            Api::AnthropicMessages => {
                self.set_id_model(d);
                self.finish(s(d, "stop_reason"));
                if let Some(u) = d.get("usage") {
                    self.anthropic_usage(u);
                }
            }
            Api::Gemini => self.gemini(d, &mut |_| {}),
            Api::OllamaChat | Api::OllamaGenerate => self.ollama(d),
        }
    }

    fn attributes(&self, attrs: &mut Map<String, Value>) {
        if let Some(id) = &self.id {
            attrs.insert("gen_ai.response.id".into(), id.as_str().into());
        }
        if let Some(m) = &self.model {
            attrs.insert("gen_ai.response.model".into(), m.as_str().into());
        }
        if !self.finish_reasons.is_empty() {
            attrs.insert(
                "gen_ai.response.finish_reasons".into(),
                json!(self.finish_reasons),
            );
        }
        for (key, v) in [
            ("gen_ai.usage.input_tokens", self.input_tokens),
            ("gen_ai.usage.output_tokens", self.output_tokens),
            ("gen_ai.usage.cache_read.input_tokens", self.cache_read),
            (
                "gen_ai.usage.cache_creation.input_tokens",
                self.cache_creation,
            ),
        ] {
            if let Some(v) = v {
                attrs.insert(key.into(), v.into());
            }
        }
    }
}

/// A streamed answer being reassembled as its bytes arrive.
#[derive(Debug, Clone)]
pub struct Stream {
    api: Api,
    reader: events::Reader,
    text: String,
    max_text: usize,
    text_cut: bool,
    reply: Reply,
    done: bool,
}

impl Stream {
    /// Body bytes of the response, after transfer decoding, in order.
    pub fn feed(&mut self, bytes: &[u8]) {
        let Stream {
            api,
            reader,
            text,
            max_text,
            text_cut,
            reply,
            done,
        } = self;
        let mut append = |t: &str| {
            if *text_cut {
                return;
            }
            let room = max_text.saturating_sub(text.len());
            if t.len() <= room {
                text.push_str(t);
            } else {
                let mut cut = room;
                while !t.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.push_str(&t[..cut]);
                *text_cut = true;
            }
        };
        reader.feed(bytes, &mut |e| {
            if e.data.trim() == "[DONE]" {
                *done = true;
                return;
            }
            let Ok(v) = serde_json::from_str::<Value>(e.data) else {
                return;
            };
            let kind = v
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or(e.kind)
                .to_string();
            event(*api, &kind, &v, reply, &mut append, done);
        });
    }

    /// The stream reached its end event: the answer is whole even if the connection
    /// closes before the body's framing ends (clients close right after `[DONE]`).
    pub fn done(&self) -> bool {
        self.done
    }

    pub fn attributes(&self, attrs: &mut Map<String, Value>) {
        self.reply.attributes(attrs);
        if !self.text.is_empty() {
            let mut message = json!({
                "role": "assistant",
                "parts": [{"type": "text", "content": self.text}],
            });
            if let Some(r) = self.reply.finish_reasons.last() {
                message["finish_reason"] = r.as_str().into();
            }
            attrs.insert(
                "gen_ai.output.messages".into(),
                json!([message]).to_string().into(),
            );
        }
        if self.text_cut {
            attrs.insert("gen_ai.output.messages_truncated".into(), true.into());
        }
        if self.reader.dropped > 0 {
            attrs.insert(
                "gen_ai.stream.events_dropped".into(),
                self.reader.dropped.into(),
            );
        }
    }
}

/// One stream event of `api`.
fn event(
    api: Api,
    kind: &str,
    v: &Value,
    reply: &mut Reply,
    text: &mut dyn FnMut(&str),
    done: &mut bool,
) {
    match api {
        Api::OpenAiChat | Api::OpenAiCompletions | Api::OpenAiEmbeddings => {
            reply.set_id_model(v);
            for c in v
                .get("choices")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                // Only the first choice's text: several choices interleave their deltas.
                if n(c, "index").unwrap_or(0) == 0 {
                    let t = c
                        .pointer("/delta/content")
                        .or_else(|| c.get("text"))
                        .and_then(Value::as_str);
                    if let Some(t) = t {
                        text(t);
                    }
                }
                reply.finish(s(c, "finish_reason"));
            }
            if let Some(u) = v.get("usage") {
                reply.openai_usage(u);
            }
        }
        Api::OpenAiResponses => match kind {
            "response.output_text.delta" => {
                if let Some(t) = v.get("delta").and_then(Value::as_str) {
                    text(t);
                }
            }
            "response.created" | "response.in_progress" => {
                if let Some(r) = v.get("response") {
                    reply.set_id_model(r);
                }
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                if let Some(r) = v.get("response") {
                    reply.openai_response(r);
                }
                *done = true;
            }
            _ => {}
        },
        Api::AnthropicMessages => match kind {
            "message_start" => {
                if let Some(m) = v.get("message") {
                    reply.set_id_model(m);
                    if let Some(u) = m.get("usage") {
                        reply.anthropic_usage(u);
                    }
                }
            }
            "content_block_delta" => {
                if let Some(t) = v.pointer("/delta/text").and_then(Value::as_str) {
                    text(t);
                }
            }
            "message_delta" => {
                reply.finish(
                    v.pointer("/delta/stop_reason")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                );
                if let Some(u) = v.get("usage") {
                    reply.anthropic_usage(u);
                }
            }
            "message_stop" => *done = true,
            _ => {}
        },
        // Gemini's stream has no end event: the body's framing ends it.
        Api::Gemini => reply.gemini(v, text),
        Api::OllamaChat | Api::OllamaGenerate => {
            let t = v
                .pointer("/message/content")
                .or_else(|| v.get("response"))
                .and_then(Value::as_str);
            if let Some(t) = t {
                text(t);
            }
            reply.ollama(v);
            if v.get("done").and_then(Value::as_bool) == Some(true) {
                *done = true;
            }
        }
    }
}

#[cfg(test)]
mod tests;
