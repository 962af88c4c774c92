"""HTTP/2 requests with httpx (`http2=True`, through the h2 library) against
h2_server.py, all on one connection, one after the other.

Usage: client_h2.py BASE OUTDIR
    BASE: https://127.0.0.1:PORT (TLS, HTTP/2 chosen by ALPN h2; the server's
    self-signed certificate is not verified) or http://127.0.0.1:PORT (cleartext, HTTP/2
    by prior knowledge: the client starts with the connection preface).

Writes OUTDIR/result.json: one object per request, in order, with what the client sent
and got: {"method", "url", "http_version", "status", "request_headers",
"request_body", "response_headers", "response_body"} (headers as name/value pairs, names
lowercase as HTTP/2 sends them). A request that is not answered over HTTP/2 fails the
script.

The requests:
    GET  /echo/get?q=1          with `Authorization: Bearer h2-secret-token`
    POST /echo/post             a JSON body
    PUT  /echo/put              a text body of 3000 bytes (more than one DATA frame
                                when the client splits it)
    GET  /status/404/missing    an error status
    GET  /big/100000            a response body over the agent's 64 KiB body limit
"""

import json
import os
import sys

import httpx

SECRET = "Bearer h2-secret-token"


def main():
    base, out = sys.argv[1], sys.argv[2]
    tls = base.startswith("https:")
    # Over TLS both are offered and ALPN chooses h2; in cleartext, HTTP/1.1 off means
    # HTTP/2 by prior knowledge (httpx does not do the h2c upgrade).
    client = httpx.Client(
        http2=True, http1=tls, verify=False, timeout=30.0, headers={"x-test": "h2"}
    )
    results = []
    calls = [
        ("GET", "/echo/get?q=1", None, {"authorization": SECRET}),
        ("POST", "/echo/post", json.dumps({"order": 42, "items": ["a", "b"]}).encode(),
         {"content-type": "application/json"}),
        ("PUT", "/echo/put", ("0123456789" * 300).encode(), {"content-type": "text/plain"}),
        ("GET", "/status/404/missing", None, {}),
        ("GET", "/big/100000", None, {}),
    ]
    with client:
        for method, path, body, headers in calls:
            r = client.request(method, base + path, content=body, headers=headers)
            if r.http_version != "HTTP/2":
                sys.exit(f"{method} {path} was answered over {r.http_version}, not HTTP/2")
            results.append({
                "method": method,
                "url": str(r.request.url),
                "http_version": r.http_version,
                "status": r.status_code,
                "request_headers": [[k.decode(), v.decode()] for k, v in r.request.headers.raw],
                "request_body": (body or b"").decode(),
                "response_headers": [[k.decode(), v.decode()] for k, v in r.headers.raw],
                "response_body": r.text,
            })
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
