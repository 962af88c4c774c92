#!/usr/bin/env python3
"""A fake OpenBox Core for end-to-end tests (Python 3.11 standard library only).

Implements the three API v1 routes of shared/docs/openbox-core-protocol.md:
    GET  /api/v1/auth/validate        200 for the right Bearer key, 401 otherwise
    POST /api/v1/governance/evaluate  scripted verdicts (default {"verdict": "allow"})
    POST /api/v1/governance/approval  scripted answer sequences per activity
and a control route, /_control (never recorded, never needs the key):
    GET  /_control                    the current state as JSON
    POST /_control {"down": "close"}  answer nothing: close every connection at once
    POST /_control {"down": "refuse", "for_seconds": 3}
                                      stop listening (connection refused), come back after
                                      for_seconds (required: /_control is unreachable too)
    POST /_control {"down": false}    back to normal
    POST /_control {"script": {...}}  replace the script
    POST /_control {"reset": true}    forget approval sequence positions and rule counts

CLI:
    fake_core.py [--host 127.0.0.1] [--port 0] [--api-key KEY | --any-key]
                 [--record FILE] [--script FILE] [--control-file FILE] [--port-file FILE]
                 [--agent-did DID (--agent-public-key BASE64 | --agent-key-file FILE)]

    --agent-did/--agent-public-key register one OpenBox DID identity (protocol §1.3) and
    make every route require requests signed by it, as Core does for a signed agent: the
    five X-OpenBox-* headers, the body's SHA-256, a timestamp within +-300 s, a nonce not
    seen before and an Ed25519 signature over the canonical string. A request that fails
    any of these is answered 401 {"reason_code": ...} (signature_invalid,
    did_agent_mismatch, timestamp_outside_window, nonce_replayed); the record line says
    why in "signature" ("ok" or the reason code). --agent-key-file registers the public
    key of a test's private key file (base64 seed, as the agent reads it) instead.

    --port 0 picks a free port. When ready it prints "listening on PORT" (flushed) on stdout,
    and writes PORT to --port-file if given. --api-key defaults to obx_test_fakecore.
    --record FILE appends one JSON line per request: {"time", "method", "path", "headers"
    (names lowercased), "body" (parsed JSON, or null when empty), "raw_body" (only when not
    JSON), "status" (what was answered; 0 = connection closed)}.
    --script FILE is re-read whenever it changes. --control-file FILE is polled every 0.1 s:
    its JSON content {"down": false | "close" | "refuse"} sets the down state (the way to
    bring back a server that is not listening without a timer). SIGTERM/SIGINT stop it.

Script (JSON):
    {
      "default": {"verdict": "allow"},            # evaluate body when no rule matches
      "validate": {"status": 200},                # optional override of the validate answer
      "rules": [                                  # first match wins
        {"match": {"event_type": "ActivityStarted", "activity_type": ["pay", "refund"]},
         "status": 200,                           # default 200
         "body": {"verdict": "require_approval", "reason": "needs a human"},
         "raw": "not json",                       # instead of body: a non-JSON answer
         "delay": 1.5,                            # seconds before answering
         "close": true,                           # close the connection without answering
         "times": 2}                              # only the first 2 matching requests
      ],
      "approvals": [                              # per activity, a sequence; the last repeats
        {"match": {"activity_id": "1"},
         "responses": [{"body": {"verdict": "require_approval"}}, {"body": {"verdict": "allow"}}]}
      ],
      "approval_default": {"verdict": "allow"}
    }
    A match maps top-level body fields to a value (equality), a list (any of), or a string
    "re:REGEX" (regular-expression search on the value's text). A match naming
    "event_type" but not "hook_trigger" skips SDK 2.0 hook events (section 3.2: they say
    "ActivityStarted" too), so a lifecycle rule and its "times" are not spent on them. Every response entry
    (rules, approval responses) accepts status, body, raw, delay and close.
"""

import argparse
import base64
import hashlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VALIDATE = "/api/v1/auth/validate"
EVALUATE = "/api/v1/governance/evaluate"
APPROVAL = "/api/v1/governance/approval"


# --- Ed25519 verification (RFC 8032 section 5.1.7), standard library only ----------------
# Slow (a few ms per signature) and not constant time: a test server's needs only.
_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _add(a, b):
    """Sum of two points in extended coordinates (X, Y, Z, T); also doubles."""
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    pa = (y1 - x1) * (y2 - x2) % _P
    pb = (y1 + x1) * (y2 + x2) % _P
    pc = t1 * 2 * _D * t2 % _P
    pd = z1 * 2 * z2 % _P
    e, f, g, h = pb - pa, pd - pc, pd + pc, pb + pa
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(k, point):
    acc = (0, 1, 1, 0)
    while k:
        if k & 1:
            acc = _add(acc, point)
        point = _add(point, point)
        k >>= 1
    return acc


def _decode_point(raw):
    """The point encoded in 32 bytes, or None when it is not one."""
    if len(raw) != 32:
        return None
    y = int.from_bytes(raw, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _P - x
    return (x, y, 1, x * y % _P)


def ed25519_public_key(seed):
    """The public key of a 32-byte seed (RFC 8032 section 5.1.5)."""
    h = hashlib.sha512(seed).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    x, y, z, _ = _mul(a, _BASE)
    zi = pow(z, _P - 2, _P)
    x, y = x * zi % _P, y * zi % _P
    return (y | (x & 1) << 255).to_bytes(32, "little")


_BASE = _decode_point((4 * pow(5, _P - 2, _P) % _P).to_bytes(32, "little"))


def ed25519_verify(public, message, signature):
    if len(signature) != 64:
        return False
    a, r = _decode_point(public), _decode_point(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= _L:
        return False
    k = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % _L
    left = _mul(s, _BASE)
    right = _add(r, _mul(k, a))
    # Equal points: X1/Z1 == X2/Z2 and Y1/Z1 == Y2/Z2.
    return (left[0] * right[2] - right[0] * left[2]) % _P == 0 and (
        left[1] * right[2] - right[1] * left[2]
    ) % _P == 0


def check_signature(state, method, path, headers, raw):
    """None when the request is signed by the registered identity, else the reason code."""
    h = {k.lower(): v for k, v in headers.items()}
    did = h.get("x-openbox-agent-did")
    stamp = h.get("x-openbox-agent-timestamp")
    nonce = h.get("x-openbox-agent-nonce")
    sig = h.get("x-openbox-agent-signature")
    sha = h.get("x-openbox-body-sha256")
    if not (did and stamp and nonce and sig and sha):
        return "signature_invalid"
    if did != state.args.agent_did:
        return "did_agent_mismatch"
    if sha != hashlib.sha256(raw).hexdigest():
        return "signature_invalid"
    try:
        from datetime import datetime

        at = datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return "timestamp_outside_window"
    if not stamp.endswith("+00:00") or abs(time.time() - at) > 300:
        return "timestamp_outside_window"
    canonical = "\n".join([method.upper(), path, stamp, nonce, sha]).encode("utf-8")
    try:
        signature = base64.b64decode(sig, validate=True)
    except ValueError:
        return "signature_invalid"
    if not ed25519_verify(state.public_key, canonical, signature):
        return "signature_invalid"
    with state.lock:
        if nonce in state.nonces:
            return "nonce_replayed"
        state.nonces.add(nonce)
    return None


class State:
    def __init__(self, args):
        self.lock = threading.Lock()
        self.args = args
        self.down = False  # False | "close" | "refuse"
        self.script = {}
        self.script_mtime = None
        self.rule_hits = {}
        self.approval_pos = {}
        self.up_at = None
        self.record_lock = threading.Lock()
        self.nonces = set()
        self.public_key = base64.b64decode(args.agent_public_key) if args.agent_public_key else None
        if args.agent_key_file:
            with open(args.agent_key_file, encoding="ascii") as f:
                self.public_key = ed25519_public_key(base64.b64decode(f.read().strip()))
        self.load_script()

    def load_script(self):
        path = self.args.script
        if not path:
            return
        try:
            mtime = os.stat(path).st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self.script_mtime:
            return
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            script = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as e:
            print(f"fake_core: script {path} is not valid JSON ({e}); keeping the previous one", file=sys.stderr, flush=True)
            return
        with self.lock:
            self.script = script
            self.script_mtime = mtime
            self.rule_hits.clear()
            self.approval_pos.clear()

    def record(self, entry):
        if not self.args.record:
            return
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self.record_lock, open(self.args.record, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()


def matches(match, body):
    if not isinstance(body, dict):
        return not match
    match = match or {}
    # A hook event (SDK 2.0, section 3.2) says event_type "ActivityStarted" at both of its
    # stages: a rule naming an event type means the lifecycle event unless it names
    # hook_trigger too.
    if "event_type" in match and "hook_trigger" not in match and body.get("hook_trigger") is True:
        return False
    for key, want in match.items():
        have = body.get(key)
        text = have if isinstance(have, str) else json.dumps(have)
        if isinstance(want, list):
            if not any(have == w for w in want):
                return False
        elif isinstance(want, str) and want.startswith("re:"):
            if have is None or not re.search(want[3:], text):
                return False
        elif have != want:
            return False
    return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-openbox-core/1"

    def setup(self):
        super().setup()
        # Without this, keep-alive requests pay a 40 ms delayed-ACK stall.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):
        if self.server.state.args.verbose:
            sys.stderr.write("fake_core: " + (fmt % args) + "\n")

    def do_GET(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send(self, status, body=None, raw=None, content_type="application/json"):
        if raw is not None:
            payload = raw.encode("utf-8") if isinstance(raw, str) else raw
            content_type = "text/plain"
        else:
            payload = json.dumps(body if body is not None else {}, separators=(",", ":")).encode("utf-8")
        head = (
            f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n"
            f"Server: {self.server_version}\r\n\r\n"
        ).encode("latin-1")
        # One write: headers and body in the same segment.
        self.wfile.write(head + payload)
        self.wfile.flush()

    def close_now(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def answer(self, spec):
        """Apply one scripted response entry; returns the status sent (0 = closed)."""
        if spec.get("delay"):
            time.sleep(float(spec["delay"]))
        if spec.get("close"):
            self.close_now()
            return 0
        status = int(spec.get("status", 200))
        if "raw" in spec:
            self.send(status, raw=spec["raw"])
        else:
            self.send(status, body=spec.get("body", {}))
        return status

    def handle_any(self, method):
        state = self.server.state
        path = self.path.split("?", 1)[0]
        raw = self.read_body()
        if path == "/_control":
            return self.control(method, raw)
        try:
            body = json.loads(raw) if raw else None
            raw_text = None
        except (json.JSONDecodeError, UnicodeDecodeError):
            body, raw_text = None, raw.decode("utf-8", "replace")
        entry = {
            "time": time.time(),
            "method": method,
            "path": path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body,
        }
        if raw_text is not None:
            entry["raw_body"] = raw_text
        state.load_script()
        if state.down:
            entry["status"] = 0
            state.record(entry)
            return self.close_now()
        if state.public_key is not None:
            refused = check_signature(state, method, path, self.headers, raw)
            entry["signature"] = refused or "ok"
            if refused:
                entry["status"] = 401
                state.record(entry)
                self.send(401, {"reason_code": refused, "detail": "signed request rejected"})
                return
        status = self.route(method, path, body)
        entry["status"] = status
        state.record(entry)

    def route(self, method, path, body):
        state = self.server.state
        auth = self.headers.get("Authorization", "")
        key_ok = state.args.any_key or auth == f"Bearer {state.args.api_key}"
        known = {(VALIDATE, "GET"), (EVALUATE, "POST"), (APPROVAL, "POST")}
        if (path, method) not in known:
            self.send(404, {"detail": f"no route {method} {path}"})
            return 404
        if not key_ok:
            self.send(401, {"detail": "invalid API key"})
            return 401
        with state.lock:
            script = state.script
        if path == VALIDATE:
            return self.answer(dict({"status": 200, "body": {"valid": True}}, **script.get("validate", {})))
        if path == EVALUATE:
            for i, rule in enumerate(script.get("rules", [])):
                if not matches(rule.get("match"), body):
                    continue
                with state.lock:
                    hits = state.rule_hits.get(i, 0)
                    if "times" in rule and hits >= int(rule["times"]):
                        continue
                    state.rule_hits[i] = hits + 1
                return self.answer(rule)
            return self.answer({"body": script.get("default", {"verdict": "allow"})})
        # APPROVAL
        for i, entry in enumerate(script.get("approvals", [])):
            if not matches(entry.get("match"), body):
                continue
            responses = entry.get("responses") or [{"body": {"verdict": "allow"}}]
            key = (i, json.dumps(body, sort_keys=True))
            with state.lock:
                pos = state.approval_pos.get(key, 0)
                state.approval_pos[key] = pos + 1
            return self.answer(responses[min(pos, len(responses) - 1)])
        return self.answer({"body": script.get("approval_default", {"verdict": "allow"})})

    def control(self, method, raw):
        state = self.server.state
        if method == "POST":
            try:
                cmd = json.loads(raw or b"{}")
            except json.JSONDecodeError:
                self.send(400, {"detail": "control body must be JSON"})
                return
            with state.lock:
                if "script" in cmd:
                    state.script = cmd["script"]
                    state.script_mtime = None
                    state.rule_hits.clear()
                    state.approval_pos.clear()
                if cmd.get("reset"):
                    state.rule_hits.clear()
                    state.approval_pos.clear()
            if "down" in cmd:
                down = cmd["down"]
                if down not in (False, "close", "refuse", True):
                    self.send(400, {"detail": "down must be false, \"close\" or \"refuse\""})
                    return
                if down == "refuse" and not cmd.get("for_seconds"):
                    self.send(400, {"detail": "down=refuse needs for_seconds (or use --control-file)"})
                    return
                state.down = "close" if down is True else down
                state.up_at = time.time() + float(cmd["for_seconds"]) if cmd.get("for_seconds") else None
        self.send(200, {"down": state.down, "script": state.script,
                        "port": self.server.server_address[1]})


def main():
    ap = argparse.ArgumentParser(description="A fake OpenBox Core (see the module docstring).")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--api-key", default="obx_test_fakecore")
    ap.add_argument("--any-key", action="store_true", help="accept any Bearer key")
    ap.add_argument("--record")
    ap.add_argument("--script")
    ap.add_argument("--control-file")
    ap.add_argument("--port-file")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--agent-did", help="the registered OpenBox agent DID (requires signatures)")
    ap.add_argument("--agent-public-key", help="its Ed25519 public key, base64 of the raw 32 bytes")
    ap.add_argument("--agent-key-file", help="register the public key of this seed file instead")
    args = ap.parse_args()
    if bool(args.agent_did) != bool(args.agent_public_key or args.agent_key_file):
        ap.error("--agent-did and --agent-public-key (or --agent-key-file) go together")

    state = State(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def watch_control():
        last = None
        while not stop.is_set():
            if args.control_file:
                try:
                    with open(args.control_file, encoding="utf-8") as f:
                        text = f.read()
                except FileNotFoundError:
                    text = ""
                if text != last:
                    last = text
                    try:
                        down = json.loads(text).get("down", False) if text.strip() else False
                    except (json.JSONDecodeError, AttributeError):
                        down = state.down
                    state.down = "close" if down is True else down
                    state.up_at = None
            if state.up_at is not None and time.time() >= state.up_at:
                state.down, state.up_at = False, None
            state.load_script()
            stop.wait(0.1)

    threading.Thread(target=watch_control, daemon=True).start()

    port = args.port
    announced = False
    while not stop.is_set():
        if state.down == "refuse":
            stop.wait(0.05)
            continue
        ThreadingHTTPServer.allow_reuse_address = True
        ThreadingHTTPServer.daemon_threads = True
        server = ThreadingHTTPServer((args.host, port), Handler)
        server.state = state
        port = server.server_address[1]
        if not announced:
            if args.port_file:
                with open(args.port_file, "w", encoding="utf-8") as f:
                    f.write(f"{port}\n")
            print(f"listening on {port}", flush=True)
            announced = True
        t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        t.start()
        while not stop.is_set() and state.down != "refuse":
            stop.wait(0.05)
        server.shutdown()
        server.server_close()
        t.join()


if __name__ == "__main__":
    main()
