"""The same six HTTP/1.1 requests through one Python client library, on one keep-alive
connection where the library allows it.

Usage: client_http.py LIB BASE_URL OUTDIR
LIB: httpx | requests | urllib3 | aiohttp. BASE_URL: tls_server.py's, e.g.
http://127.0.0.1:PORT or https://127.0.0.1:PORT (certificate not verified).

Requests, in order (M = LIB, so paths are unique per library):
  1. GET  /json/M-get?q=1       Authorization: Bearer sk-M-secret, X-Marker: M-get
  2. POST /echo/M-post          Content-Type: application/json, body {"marker": "M-post"}
  3. GET  /status/500/M-err     (the server answers 500)
  4. GET  /binary/64            (application/octet-stream: no response_body in the span)
  5. GET  /chunked/M-chunk      (Transfer-Encoding: chunked)
  6. GET  /cookie/M-cookie      (Set-Cookie in the response)
Writes OUTDIR/result.json: [{"method","target","status","body"(text or null),"headers"}]
in request order.
"""

import asyncio
import json
import os
import sys


def requests_list(lib):
    return [
        ("GET", f"/json/{lib}-get?q=1",
         {"Authorization": f"Bearer sk-{lib}-secret", "X-Marker": f"{lib}-get"}, None),
        ("POST", f"/echo/{lib}-post", {"Content-Type": "application/json"},
         json.dumps({"marker": f"{lib}-post"}).encode()),
        ("GET", f"/status/500/{lib}-err", {}, None),
        ("GET", "/binary/64", {}, None),
        ("GET", f"/chunked/{lib}-chunk", {}, None),
        ("GET", f"/cookie/{lib}-cookie", {}, None),
    ]


def text_or_none(content_type, raw):
    return None if content_type == "application/octet-stream" else raw.decode()


def run_httpx(base, reqs):
    import httpx

    out = []
    with httpx.Client(verify=False, http2=False) as client:
        for method, target, headers, body in reqs:
            r = client.request(method, base + target, headers=headers, content=body)
            out.append((method, target, r.status_code, r.headers.get("content-type"), r.content, dict(r.headers)))
    return out


def run_requests(base, reqs):
    import requests
    import urllib3

    urllib3.disable_warnings()
    out = []
    with requests.Session() as s:
        for method, target, headers, body in reqs:
            r = s.request(method, base + target, headers=headers, data=body, verify=False)
            out.append((method, target, r.status_code, r.headers.get("content-type"), r.content, dict(r.headers)))
    return out


def run_urllib3(base, reqs):
    import urllib3

    urllib3.disable_warnings()
    out = []
    with urllib3.PoolManager(cert_reqs="CERT_NONE", maxsize=1) as pool:
        for method, target, headers, body in reqs:
            r = pool.request(method, base + target, headers=headers, body=body, retries=False)
            out.append((method, target, r.status, r.headers.get("content-type"), r.data, dict(r.headers)))
    return out


def run_aiohttp(base, reqs):
    import aiohttp

    async def go():
        out = []
        conn = aiohttp.TCPConnector(ssl=False, limit=1)
        async with aiohttp.ClientSession(connector=conn) as s:
            for method, target, headers, body in reqs:
                async with s.request(method, base + target, headers=headers, data=body) as r:
                    data = await r.read()
                    out.append((method, target, r.status, r.headers.get("content-type"), data, dict(r.headers)))
        return out

    return asyncio.run(go())


def main():
    lib, base, outdir = sys.argv[1], sys.argv[2].rstrip("/"), sys.argv[3]
    runner = {"httpx": run_httpx, "requests": run_requests, "urllib3": run_urllib3,
              "aiohttp": run_aiohttp}[lib]
    results = runner(base, requests_list(lib))
    out = []
    for method, target, status, ctype, raw, headers in results:
        out.append({"method": method, "target": target, "status": status,
                    "body": text_or_none(ctype, raw), "headers": headers})
    assert [r["status"] for r in out] == [200, 200, 500, 200, 200, 200], out
    with open(os.path.join(outdir, "result.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
