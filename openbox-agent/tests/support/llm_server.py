"""A fake LLM server on 127.0.0.1 (plain HTTP/1.1, keep-alive) speaking the OpenAI chat
completions and responses APIs and Anthropic's messages API, for the LLM-call tests.

Usage: llm_server.py [PORT]    (0, the default, picks a free port; printed first on stdout)

The first path segment chooses the response coding, the rest is the API path:
    /gzip/v1/chat/completions    JSON answer, Content-Encoding: gzip
    /br/v1/responses             JSON answer, Content-Encoding: br
    /identity/v1/messages        JSON answer, not coded
A request with `"stream": true` is answered with server-sent events (chunked, never
coded), each event in its own chunk, ending as the real APIs end: `data: [DONE]` (chat
completions), `response.completed` (responses), `message_stop` (messages).

Answers are deterministic: the text is `Answer to: <last user text>`; the id is
`<kind>-<n>` (n counts requests from 1); usage is 11 input and 7 output tokens; the
finish reason is `stop` / `completed` / `end_turn`; the model is the request's model
with `-2026` appended.
"""

import gzip
import itertools
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import brotli

INPUT_TOKENS = 11
OUTPUT_TOKENS = 7
COUNTER = itertools.count(1)


def last_user_text(req):
    if "input" in req:
        inp = req["input"]
        if isinstance(inp, str):
            return inp
        msgs = inp
    else:
        msgs = req.get("messages", [])
    for m in reversed(msgs):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return ""


def pieces(text):
    """The answer in a few deltas, as a model streams it."""
    words = text.split(" ")
    return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]


def chat(req, n, text, model):
    if req.get("stream"):
        ident = f"chatcmpl-{n}"
        base = {"id": ident, "object": "chat.completion.chunk", "created": 1, "model": model}
        events = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}])]
        events += [dict(base, choices=[{"index": 0, "delta": {"content": p}, "finish_reason": None}])
                   for p in pieces(text)]
        events.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        if req.get("stream_options", {}).get("include_usage"):
            events.append(dict(base, choices=[], usage={
                "prompt_tokens": INPUT_TOKENS, "completion_tokens": OUTPUT_TOKENS,
                "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS}))
        return [(None, json.dumps(e)) for e in events] + [(None, "[DONE]")]
    return {
        "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": INPUT_TOKENS, "completion_tokens": OUTPUT_TOKENS,
                  "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS},
    }


def responses(req, n, text, model):
    ident = f"resp-{n}"
    msg = {"id": f"msg-{n}", "type": "message", "role": "assistant", "status": "completed",
           "content": [{"type": "output_text", "text": text, "annotations": []}]}
    done = {
        "id": ident, "object": "response", "created_at": 1, "model": model, "status": "completed",
        "output": [msg], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS,
                  "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
                  "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}},
    }
    if not req.get("stream"):
        return done
    started = dict(done, status="in_progress", output=[], usage=None)
    seq = itertools.count()
    events = [("response.created", {"type": "response.created", "response": started})]
    for p in pieces(text):
        events.append(("response.output_text.delta", {
            "type": "response.output_text.delta", "item_id": f"msg-{n}", "output_index": 0,
            "content_index": 0, "delta": p, "logprobs": []}))
    events.append(("response.completed", {"type": "response.completed", "response": done}))
    out = []
    for kind, e in events:
        e["sequence_number"] = next(seq)
        out.append((kind, json.dumps(e)))
    return out


def messages(req, n, text, model):
    ident = f"msg-{n}"
    if not req.get("stream"):
        return {
            "id": ident, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS},
        }
    events = [
        ("message_start", {"type": "message_start", "message": {
            "id": ident, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
    ]
    for p in pieces(text):
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": p}}))
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": OUTPUT_TOKENS}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return [(k, json.dumps(e)) for k, e in events]


APIS = {"/v1/chat/completions": chat, "/v1/responses": responses, "/v1/messages": messages}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("llm_server: " + (fmt % args) + "\n")

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        _, coding, rest = self.path.split("?")[0].split("/", 2)
        api = APIS.get("/" + rest)
        if api is None or coding not in ("gzip", "br", "identity"):
            self.answer(404, b'{"error": {"message": "no such API"}}', "identity")
            return
        req = json.loads(raw)
        n = next(COUNTER)
        text = "Answer to: " + last_user_text(req)
        out = api(req, n, text, req.get("model", "") + "-2026")
        if isinstance(out, list):
            self.stream(out)
        else:
            self.answer(200, json.dumps(out).encode(), coding)

    def answer(self, status, body, coding):
        if coding == "gzip":
            body = gzip.compress(body)
        elif coding == "br":
            body = brotli.compress(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if coding != "identity":
            self.send_header("Content-Encoding", coding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def stream(self, events):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        try:
            for kind, data in events:
                text = (f"event: {kind}\n" if kind else "") + f"data: {data}\n\n"
                chunk = text.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            # The client read its end event and hung up before the terminator.
            self.close_connection = True


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
