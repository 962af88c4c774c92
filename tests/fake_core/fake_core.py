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

    --okta-key-file FILE registers an Okta AI agent (API v2, protocol §1.3) whose RS256 key
    is the PKCS8 PEM private key in FILE (the test's own; its public half is what Core
    keeps), with the ids of OKTA_IDS below. Then GET /api/v2/auth/bootstrap answers its
    bootstrap document (with the key's RFC 7638 thumbprint), the /api/v2 routes require
    X-OpenBox-Agent-Assertion (header, claims, audience, API-key hash, htm/htu, body hash,
    exp window <= 60 s around now, jti not seen before, RS256 signature) and answer 401
    {"reason_code": ...} when it fails (assertion_missing, assertion_invalid,
    signature_invalid, audience_mismatch, claims_mismatch, body_hash_mismatch,
    assertion_expired, proof_replayed); the v1 and v3 routes are refused with
    identity_method_mismatch.
    --workload-key-file FILE registers a workload service account (API v3) with that key:
    GET /api/v3/auth/bootstrap answers its document, POST
    /realms/openbox/protocol/openid-connect/token (this server is its own token endpoint)
    checks the client_credentials form and its private_key_jwt assertion (RS256, iss/sub =
    client id, aud = the token endpoint, exp window, jti replay; 401 {"error":
    "invalid_client", "reason_code": ...} otherwise) and issues a 300 s token; the /api/v3
    routes require X-OpenBox-Workload-Token to be one it issued (401 workload_token_invalid).
    /_control {"workload_unavailable": 404 | 409 | false} makes the bootstrap answer "no v3"
    (then the v1 routes are served unsigned, as Core does for such an agent).
    The record line of a v2/v3 request says in "identity" "ok" or the reason code.

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


# --- Okta AI agent (API v2) and workload (API v3) identities ------------------------------
# RS256 verification and key parsing in the standard library: a test server's needs only.

OKTA_IDS = {
    "openbox_agent_id": "obx-agent-e2e",
    "organization_id": "obx-org-e2e",
    "deployment_id": "obx-deployment-e2e",
    "external_agent_id": "wlp-okta-e2e",
    "credential_kid": "okta-kid-e2e",
    "assertion_audience": "https://core.openbox.test/agent-proof",
}
WORKLOAD_CLIENT = {"client_id": "openbox-agent-e2e", "kid": "workload-kid-e2e",
                   "service_account_id": "7d1f0e4a-3b2c-4d5e-8f60-718293a4b5c6",
                   "activation_version": "0c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f"}
TOKEN_PATH = "/realms/openbox/protocol/openid-connect/token"
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def _der(data, i):
    """(tag, contents, next index) of the DER element at i."""
    tag, length = data[i], data[i + 1]
    i += 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(data[i:i + n], "big")
        i += n
    return tag, data[i:i + length], i + length


def rsa_public_of_pkcs8_pem(text):
    """(n, e) of a PKCS8 PEM RSA private key."""
    der = base64.b64decode("".join(l for l in text.splitlines() if l and not l.startswith("-----")))
    _, info, _ = _der(der, 0)
    _, _, i = _der(info, 0)  # version
    _, _, i = _der(info, i)  # algorithm
    _, octets, _ = _der(info, i)
    _, rsa, _ = _der(octets, 0)
    _, _, j = _der(rsa, 0)  # version
    _, n, j = _der(rsa, j)
    _, e, _ = _der(rsa, j)
    return int.from_bytes(n, "big"), int.from_bytes(e, "big")


def _b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64url(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def jwk_thumbprint(n, e):
    """RFC 7638 SHA-256 thumbprint of an RSA public key."""
    def uint(v):
        return _b64url(v.to_bytes(max(1, (v.bit_length() + 7) // 8), "big"))
    canonical = json.dumps({"e": uint(e), "kty": "RSA", "n": uint(n)}, sort_keys=True, separators=(",", ":"))
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def rs256_verify(public, message, signature):
    n, e = public
    k = (n.bit_length() + 7) // 8
    if len(signature) != k:
        return False
    em = pow(int.from_bytes(signature, "big"), e, n).to_bytes(k, "big")
    t = _SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    return em == b"\x00\x01" + b"\xff" * (k - 3 - len(t)) + b"\x00" + t


def verify_jws(state, public, token, typ):
    """(header, claims) of a valid compact RS256 JWS, or (None, reason code)."""
    parts = token.split(".") if token else []
    if len(parts) != 3:
        return None, "assertion_invalid"
    try:
        header = json.loads(_b64url_decode(parts[0]))
        claims = json.loads(_b64url_decode(parts[1]))
        signature = _b64url_decode(parts[2])
    except (ValueError, json.JSONDecodeError):
        return None, "assertion_invalid"
    if header.get("alg") != "RS256" or header.get("typ") != typ:
        return None, "assertion_invalid"
    if not rs256_verify(public, f"{parts[0]}.{parts[1]}".encode("ascii"), signature):
        return None, "signature_invalid"
    iat, exp = claims.get("iat"), claims.get("exp")
    now = time.time()
    if not (isinstance(iat, int) and isinstance(exp, int)) or not (0 < exp - iat <= 60) \
            or iat > now + 30 or exp < now - 5:
        return None, "assertion_expired"
    jti = claims.get("jti")
    with state.lock:
        if not jti or jti in state.jtis:
            return None, "proof_replayed"
        state.jtis.add(jti)
    return (header, claims), None


def check_okta_assertion(state, method, path, headers, raw):
    """None when the v2 request carries a valid assertion of the registered agent."""
    h = {k.lower(): v for k, v in headers.items()}
    token = h.get("x-openbox-agent-assertion")
    if not token:
        return "assertion_missing"
    ok, refused = verify_jws(state, state.okta_public, token, "openbox-agent-proof+jwt")
    if refused:
        return refused
    header, claims = ok
    if header.get("kid") != OKTA_IDS["credential_kid"]:
        return "signature_invalid"
    if claims.get("aud") != OKTA_IDS["assertion_audience"]:
        return "audience_mismatch"
    bearer = h.get("authorization", "").removeprefix("Bearer ")
    want = {"iss": OKTA_IDS["external_agent_id"], "sub": OKTA_IDS["external_agent_id"],
            "obx_agent_id": OKTA_IDS["openbox_agent_id"],
            "obx_organization_id": OKTA_IDS["organization_id"],
            "obx_deployment_id": OKTA_IDS["deployment_id"],
            "obx_api_key_sha256": hashlib.sha256(bearer.encode()).hexdigest(),
            "htm": method.upper(), "htu": path}
    if any(claims.get(k) != v for k, v in want.items()):
        return "claims_mismatch"
    if claims.get("body_sha256") != hashlib.sha256(raw).hexdigest():
        return "body_hash_mismatch"
    return None


def okta_bootstrap_document(state):
    doc = {k: v for k, v in OKTA_IDS.items() if k not in ("external_agent_id", "credential_kid")}
    doc.update({
        "bootstrap_version": 1,
        "identity_method": "okta_ai_agent",
        "authority": {"assignment_id": "a-1", "provider_generation_id": "g-1", "generation_number": 1,
                      "activation_version": "v-1", "identity_id": "i-1", "credential_id": "c-1",
                      "projection_version": "p-1"},
        "okta": {"external_agent_id": OKTA_IDS["external_agent_id"],
                 "credential_kid": OKTA_IDS["credential_kid"], "algorithm": "RS256",
                 "public_jwk_thumbprint": jwk_thumbprint(*state.okta_public)},
    })
    return doc


def workload_bootstrap_document(state, base):
    issuer = base + TOKEN_PATH.removesuffix("/protocol/openid-connect/token")
    return dict(WORKLOAD_CLIENT, bootstrap_version=3, contract_version=3, issuer=issuer,
                token_endpoint=issuer + "/protocol/openid-connect/token",
                audience="openbox-core", identity_source="openbox")


def workload_token_answer(state, base, raw):
    """(status, body) of the token endpoint for this form."""
    from urllib.parse import parse_qs

    form = {k: v[0] for k, v in parse_qs(raw.decode("ascii", "replace")).items()}
    refuse = lambda code: (401, {"error": "invalid_client", "reason_code": code})  # noqa: E731
    if form.get("grant_type") != "client_credentials" \
            or form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" \
            or form.get("client_id") != WORKLOAD_CLIENT["client_id"]:
        return refuse("invalid_request")
    ok, refused = verify_jws(state, state.workload_public, form.get("client_assertion"), "JWT")
    if refused:
        return refuse(refused)
    header, claims = ok
    client = WORKLOAD_CLIENT["client_id"]
    if header.get("kid") != WORKLOAD_CLIENT["kid"] or claims.get("iss") != client \
            or claims.get("sub") != client:
        return refuse("claims_mismatch")
    if claims.get("aud") != base + TOKEN_PATH:
        return refuse("audience_mismatch")
    token = _b64url(os.urandom(24))
    with state.lock:
        state.workload_tokens.add(token)
    return 200, {"access_token": token, "token_type": "Bearer", "expires_in": 300}


def identity_route(handler, method, path, raw):
    """Handle the v2/v3 identity routes and checks. Returns (answered, v1 path, reason):
    answered -> the request is done; otherwise route it as v1 `path`, or refuse `reason`."""
    state = handler.server.state
    base = f"http://{handler.headers.get('Host')}"
    key_ok = state.args.any_key or handler.headers.get("Authorization", "") == f"Bearer {state.args.api_key}"
    if path == "/api/v2/auth/bootstrap" and method == "GET" and state.okta_public:
        if not key_ok:
            handler.send(401, {"reason_code": "invalid_api_key"})
            return 401, None, None
        handler.send(200, okta_bootstrap_document(state))
        return 200, None, None
    if path == "/api/v3/auth/bootstrap" and method == "GET" and state.workload_public:
        if state.workload_unavailable == 404:
            handler.send(404, {"detail": "no route"})
            return 404, None, None
        if state.workload_unavailable:
            handler.send(409, {"reason_code": "workload_identity_unavailable"})
            return 409, None, None
        if not key_ok:
            handler.send(401, {"reason_code": "invalid_api_key"})
            return 401, None, None
        handler.send(200, workload_bootstrap_document(state, base))
        return 200, None, None
    if path == TOKEN_PATH and method == "POST" and state.workload_public:
        status, body = workload_token_answer(state, base, raw)
        handler.send(status, body)
        return status, None, None
    version = path[len("/api/"):len("/api/v1")] if path.startswith("/api/v") else None
    if state.okta_public:
        if version != "v2":
            return None, path, "identity_method_mismatch"
        return None, "/api/v1" + path[len("/api/v2"):], check_okta_assertion(state, method, path, handler.headers, raw)
    if state.workload_public:
        if version == "v3":
            token = handler.headers.get("X-OpenBox-Workload-Token")
            with state.lock:
                valid = token in state.workload_tokens
            return None, "/api/v1" + path[len("/api/v3"):], None if valid else "workload_token_invalid"
        if version == "v1" and state.workload_unavailable:
            return None, path, None
        return None, path, "identity_method_mismatch"
    return None, path, None


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
        self.jtis = set()
        self.workload_tokens = set()
        self.workload_unavailable = False  # False | 404 | 409
        self.okta_public = self.workload_public = None
        if args.okta_key_file:
            with open(args.okta_key_file, encoding="ascii") as f:
                self.okta_public = rsa_public_of_pkcs8_pem(f.read())
        if args.workload_key_file:
            with open(args.workload_key_file, encoding="ascii") as f:
                self.workload_public = rsa_public_of_pkcs8_pem(f.read())
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
        if state.okta_public or state.workload_public:
            answered, path, refused = identity_route(self, method, path, raw)
            if answered is not None:
                entry["status"] = answered
                state.record(entry)
                return
            entry["identity"] = refused or "ok"
            if refused:
                entry["status"] = 401
                state.record(entry)
                self.send(401, {"reason_code": refused, "detail": "identity rejected"})
                return
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
                if "workload_unavailable" in cmd:
                    state.workload_unavailable = cmd["workload_unavailable"]
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
    ap.add_argument("--okta-key-file", help="register an Okta AI agent with this PKCS8 PEM RSA key")
    ap.add_argument("--workload-key-file", help="register a workload service account with this key")
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
