"""LLM calls with the real `openai` (3.x) and `anthropic` Python clients against
llm_server.py, one new connection per call (a client each), one after the other.

Usage: client_llm.py BASE OUTDIR     (BASE: http://127.0.0.1:PORT)

Writes OUTDIR/result.json: one object per call, in call order, with what the client
itself got: {"name", "path", "stream", "coding", "model", "text", "id", "response_model",
"finish", "input_tokens", "output_tokens"}. A failing call fails the script.

The calls, by name:
    openai-chat-gzip        chat completion, gzip'd JSON answer
    openai-chat-br          chat completion, br JSON answer
    openai-chat-stream      chat completion streamed (with usage), SSE
    openai-responses-gzip   responses API, gzip'd JSON answer
    openai-responses-stream responses API streamed, SSE
    anthropic-br            Anthropic message, br JSON answer
    anthropic-stream        Anthropic message streamed, SSE
"""

import json
import os
import sys

import anthropic
import openai


def main():
    base, out = sys.argv[1], sys.argv[2]
    results = []

    def add(name, coding, stream, path, model, text, ident, response_model, finish, usage_in,
            usage_out):
        results.append({
            "name": name, "coding": coding, "stream": stream, "path": path, "model": model,
            "text": text, "id": ident, "response_model": response_model, "finish": finish,
            "input_tokens": usage_in, "output_tokens": usage_out,
        })

    def oa(coding):
        return openai.OpenAI(base_url=f"{base}/{coding}/v1", api_key="sk-test-secret",
                             max_retries=0)

    def an(coding):
        return anthropic.Anthropic(base_url=f"{base}/{coding}", api_key="sk-ant-test-secret",
                                   max_retries=0)

    msgs = [{"role": "user", "content": "what is two plus two"}]
    for coding in ("gzip", "br"):
        with oa(coding) as c:
            r = c.chat.completions.create(model="gpt-test", messages=msgs, temperature=0.25,
                                          max_tokens=64, top_p=0.5)
        add(f"openai-chat-{coding}", coding, False, f"/{coding}/v1/chat/completions",
            "gpt-test", r.choices[0].message.content, r.id, r.model,
            r.choices[0].finish_reason, r.usage.prompt_tokens, r.usage.completion_tokens)

    with oa("identity") as c:
        text, finish, usage, ident, model = "", None, None, None, None
        for chunk in c.chat.completions.create(model="gpt-test", messages=msgs, stream=True,
                                               stream_options={"include_usage": True}):
            ident, model = chunk.id, chunk.model
            for ch in chunk.choices:
                text += ch.delta.content or ""
                finish = ch.finish_reason or finish
            usage = chunk.usage or usage
    add("openai-chat-stream", "identity", True, "/identity/v1/chat/completions", "gpt-test",
        text, ident, model, finish, usage.prompt_tokens, usage.completion_tokens)

    with oa("gzip") as c:
        r = c.responses.create(model="gpt-resp", input="name a colour", max_output_tokens=32)
    add("openai-responses-gzip", "gzip", False, "/gzip/v1/responses", "gpt-resp",
        r.output_text, r.id, r.model, r.status, r.usage.input_tokens, r.usage.output_tokens)

    with oa("identity") as c:
        text, done = "", None
        for e in c.responses.create(model="gpt-resp", input="name a colour", stream=True):
            if e.type == "response.output_text.delta":
                text += e.delta
            elif e.type == "response.completed":
                done = e.response
    add("openai-responses-stream", "identity", True, "/identity/v1/responses", "gpt-resp",
        text, done.id, done.model, done.status, done.usage.input_tokens,
        done.usage.output_tokens)

    amsgs = [{"role": "user", "content": "say hello"}]
    with an("br") as c:
        r = c.messages.create(model="claude-test", max_tokens=50, messages=amsgs,
                              stop_sequences=["END"])
    add("anthropic-br", "br", False, "/br/v1/messages", "claude-test", r.content[0].text, r.id,
        r.model, r.stop_reason, r.usage.input_tokens, r.usage.output_tokens)

    with an("identity") as c:
        with c.messages.stream(model="claude-test", max_tokens=50, messages=amsgs) as s:
            text = "".join(s.text_stream)
            m = s.get_final_message()
    add("anthropic-stream", "identity", True, "/identity/v1/messages", "claude-test", text, m.id,
        m.model, m.stop_reason, m.usage.input_tokens, m.usage.output_tokens)

    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
