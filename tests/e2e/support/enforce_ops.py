"""The enforcement end-to-end test's activities (registered by gov_worker.py): sync
activities, so each runs on an executor thread, where the hook holds its operations
(`openbox-agent run --enforce`), and three async ones (`enf_aiohttp`,
`enf_async_upload`, `enf_bench_async`), held on the event-loop thread.

- `enf_write(p)`: writes `{dir}/{marker}.txt`; returns `{"written": path}`.
- `enf_http(p)`: a plain-HTTP `GET {url}` with `http.client`; returns status and body.
- `enf_https(p)`: an HTTPS `GET {url}` with `p["client"]`, `requests` or `httpx` (sync
  client; the test server's certificate is self-signed, so not verified); returns status
  and body.
- `enf_aiohttp(p)` (async): a `GET {url}` (plain HTTP or HTTPS, whose self-signed
  certificate is not verified) with aiohttp, or with httpx's `AsyncClient` when
  `p["client"]` is `httpx`, or with aiohttp in a Python process the activity starts
  when it is `subprocess`; returns status and body. Over HTTPS each encrypts into a
  memory BIO (asyncio's TLS) and the event loop sends the ciphertext later.
- `enf_curl_loop(p)`: starts a shell loop of `p["n"]` `curl` requests to
  `{url}/{i}` (0.1 s apart; each logs `<i> <http code> <curl exit code>`), reads its log
  as it comes and, right after the first request that succeeded (`200`, exit 0), writes
  `{dir}/{marker}-halt.txt` (Core halts on that path): the HALT provably comes after some
  of the loop's requests went through, however slowly the machine starts `curl`. Waits
  for the loop and returns its log lines, what the write gave and the seconds from the
  loop's start to the write; each line also goes to stderr as
  `enf_curl_loop <marker>: <line>`, and the write's outcome as
  `enf_curl_loop_halt <marker>: after <s> s: <outcome>`, then what opening a file for
  reading gave before the loop and after the HALT as
  `enf_curl_loop_read <marker>: before <outcome>, after <outcome>; connect <outcome>`
  (a connection to the loop's server the activity opens itself; descriptor 2 is
  never held, so the test sees them even when the activity fails).
- `enf_bench` (sync), `enf_bench_async` (async): `cargo xtask bench --only enforce`'s
  timings of allowed operations (their docstrings).
- `enf_async_upload(p)` (async): POSTs `p["size"]` bytes over HTTPS to `{url}` with
  asyncio's own streams (a memory BIO: the event loop's callbacks send what the writes
  encrypted, between the activity's steps) from a socket with a small send buffer, to a
  server that reads slowly; after `p["halt_after_s"]` seconds writes
  `{dir}/{marker}-halt.txt` (Core halts on that path), then waits for the upload to end.
  Logs `enf_async_upload <marker>: halt write <outcome>; upload <outcome>` to stderr
  and returns the same.
"""

import asyncio
import http.client
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse

from temporalio import activity


@activity.defn
def enf_write(p: dict) -> dict:
    path = os.path.join(p["dir"], f"{p['marker']}.txt")
    with open(path, "w") as f:
        f.write(f"written by {p['marker']}\n")
    return {"written": path}


@activity.defn
def enf_http(p: dict) -> dict:
    url = urllib.parse.urlsplit(p["url"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("GET", url.path)
        r = conn.getresponse()
        return {"status": r.status, "body": r.read().decode()}
    finally:
        conn.close()


@activity.defn
def enf_https(p: dict) -> dict:
    if p["client"] == "requests":
        import requests

        r = requests.get(p["url"], verify=False, timeout=30)
        return {"status": r.status_code, "body": r.text}
    import httpx

    with httpx.Client(verify=False, timeout=30) as client:
        r = client.get(p["url"])
        return {"status": r.status_code, "body": r.text}


# What `enf_aiohttp` runs in a process of its own for client "subprocess".
_AIOHTTP_GET = """
import asyncio, sys
import aiohttp
async def main(url):
    async with aiohttp.ClientSession() as session:
        async with session.get(url, ssl=False, timeout=aiohttp.ClientTimeout(total=30)) as r:
            print(r.status)
            print(await r.text(), end="")
asyncio.run(main(sys.argv[1]))
"""


@activity.defn
async def enf_aiohttp(p: dict) -> dict:
    if p.get("client") == "subprocess":
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _AIOHTTP_GET,
            p["url"],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"the aiohttp subprocess failed: {err.decode()[-400:]}")
        status, body = out.decode().split("\n", 1)
        return {"status": int(status), "body": body}
    if p.get("client") == "httpx":
        import httpx

        async with httpx.AsyncClient(verify=False, timeout=30) as client:
            r = await client.get(p["url"])
            return {"status": r.status_code, "body": r.text}
    import aiohttp

    async with aiohttp.ClientSession() as session:
        # An https URL: the test server's certificate is self-signed, not verified.
        async with session.get(
            p["url"], ssl=False, timeout=aiohttp.ClientTimeout(total=30)
        ) as r:
            return {"status": r.status, "body": await r.text()}


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.read(1)
        return "ok"
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror}"


def _write_halt_file(p: dict) -> str:
    """Writes `{dir}/{marker}-halt.txt`, the path Core halts on: "ok" or the error."""
    try:
        with open(os.path.join(p["dir"], f"{p['marker']}-halt.txt"), "w") as f:
            f.write("halt here\n")
        return "ok"
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror}"


def _connect(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=5).close()
        return "ok"
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror}"


@activity.defn
def enf_curl_loop(p: dict) -> dict:
    script = (
        'for i in $(seq 1 "$N"); do '
        'code=$(curl -s -o /dev/null --max-time 5 -w "%{http_code}" "$URL/$i"); '
        'echo "$i $code $?"; sleep 0.1; done'
    )
    env = dict(os.environ, N=str(p["n"]), URL=p["url"])
    read_before = _read(__file__)
    started = time.monotonic()
    loop = subprocess.Popen(
        ["sh", "-c", script], stdout=subprocess.PIPE, text=True, bufsize=1, env=env
    )
    lines = []
    wrote, halt_at = "never: no request of the loop succeeded", None
    for line in loop.stdout:
        line = line.rstrip("\n")
        lines.append(line)
        print(f"enf_curl_loop {p['marker']}: {line}", file=sys.stderr, flush=True)
        if halt_at is None and line.split(" ")[1:] == ["200", "0"]:
            halt_at = round(time.monotonic() - started, 3)
            wrote = _write_halt_file(p)
            print(
                f"enf_curl_loop_halt {p['marker']}: after {halt_at} s: {wrote}",
                file=sys.stderr,
                flush=True,
            )
            # After the HALT even opening a file for reading is denied, and so is a
            # connection the activity itself opens.
            print(
                f"enf_curl_loop_read {p['marker']}: before {read_before}, "
                f"after {_read(__file__)}; connect {_connect(p['url'])}",
                file=sys.stderr,
                flush=True,
            )
    loop.wait(timeout=120)
    return {"loop": lines, "halt_write": wrote, "halt_after_s": halt_at}


def _median_ns(fn, n: int) -> int:
    times = []
    for i in range(n):
        t = time.perf_counter_ns()
        fn(i)
        times.append(time.perf_counter_ns() - t)
    times.sort()
    return times[len(times) // 2]


@activity.defn
def enf_bench(p: dict) -> dict:
    """Median nanoseconds of allowed operations, for `cargo xtask bench --only enforce`
    (xtask/src/enforce_bench.rs): `write` of 1 byte to an open file (held under
    `--enforce`, let through at once: no operation to govern); `open` for appending of
    one path again and again (held, verdict remembered), `open` for reading of that path
    (held only to be denied after a HALT: let through at once) and `open` for writing of a new
    path each time (held, a Core round trip each); with `p["url"]`, a plain-HTTP GET
    (urllib.request, a new connection each) of one URL again and again (verdict remembered)
    and of a new URL each time (a Core round trip each). `p["n"]` iterations of the
    remembered cases, `p["n_new"]` of the others. Runs without Temporal too (called
    directly: the same code with no governance at all)."""
    base = os.path.join(p["dir"], p["marker"])
    n = p["n"]
    out = {}
    with open(f"{base}-w.txt", "w") as f:
        fd = f.fileno()
        out["write_1_byte"] = _median_ns(lambda i: os.write(fd, b"x"), n)

    def append(i):
        with open(f"{base}-a.txt", "a"):
            pass

    out["open_same_path"] = _median_ns(append, n)

    def read(i):
        with open(f"{base}-a.txt", "rb"):
            pass

    out["open_read"] = _median_ns(read, n)

    def fresh(i):
        with open(f"{base}-new-{i}.txt", "w"):
            pass

    out["open_new_path"] = _median_ns(fresh, p["n_new"])
    if p.get("url"):
        # urllib.request: SDK 2.0 instruments it (not http.client), for the side by side.
        import urllib.request

        def get(url):
            with urllib.request.urlopen(url, timeout=30) as r:
                r.read()

        out["http_same_url"] = _median_ns(lambda i: get(f"{p['url']}/same"), n)
        out["http_new_url"] = _median_ns(
            lambda i: get(f"{p['url']}/new/{i}"), p["n_new"]
        )
    return out


async def _median_ns_async(fn, n: int) -> int:
    times = []
    for i in range(n):
        t = time.perf_counter_ns()
        await fn(i)
        times.append(time.perf_counter_ns() - t)
    times.sort()
    return times[len(times) // 2]


@activity.defn
async def enf_bench_async(p: dict) -> dict:
    """Median nanoseconds of an HTTPS GET from an async activity, for `cargo xtask bench
    --only enforce`: aiohttp on one keep-alive session to `p["https_url"]` (asyncio's
    TLS, a memory BIO: each request's `SSL_write` encrypts into a buffer and the event
    loop sends it, the send `--enforce` holds and names by its kept plaintext,
    `TLS_UNSENT`). `p["warmup"]` requests first (the connection and its handshake), then
    `p["n"]` of one URL again and again (verdict remembered) and `p["n_new"]` of a new
    URL each (a Core round trip each under `--enforce`). Also returns how many requests
    it made in all (`https_async_requests`), for the kernel programs' cost per request.
    Runs without Temporal too (`asyncio.run`, no governance at all)."""
    import aiohttp

    base = p["https_url"]
    timeout = aiohttp.ClientTimeout(total=30)
    out = {}
    async with aiohttp.ClientSession() as session:

        async def get(url):
            # The bench server's certificate is self-signed, not verified.
            async with session.get(url, ssl=False, timeout=timeout) as r:
                await r.read()

        for i in range(p["warmup"]):
            await get(f"{base}/warmup")
        out["https_async_same_url"] = await _median_ns_async(
            lambda i: get(f"{base}/same"), p["n"]
        )
        out["https_async_new_url"] = await _median_ns_async(
            lambda i: get(f"{base}/new/{i}"), p["n_new"]
        )
    out["https_async_requests"] = p["warmup"] + p["n"] + p["n_new"]
    return out


@activity.defn
def enf_sql(p: dict) -> dict:
    """Runs `p["sql"]` with psycopg2 on a connection to `p["pg_plain_port"]`, plain unless
    `p["sslmode"]` says otherwise (autocommit); returns the first row's first column when
    there is one."""
    import psycopg2

    conn = psycopg2.connect(
        host="127.0.0.1",
        port=p["pg_plain_port"],
        user="openbox",
        dbname="shop",
        sslmode=p.get("sslmode", "disable"),
        gssencmode="disable",
        connect_timeout=30,
    )
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(p["sql"])
            row = cur.fetchone() if cur.description else None
        return {"value": row[0] if row else None}
    finally:
        conn.close()


@activity.defn
async def enf_async_upload(p: dict) -> dict:
    url = urllib.parse.urlsplit(p["url"])
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test server's certificate is self-signed
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (url.hostname, url.port))
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=context, server_hostname=url.hostname
    )
    size = p["size"]
    writer.write(
        f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode()
    )
    # Encrypted now, in this step; sent by the loop's callbacks as the server reads.
    writer.write(b"u" * size)
    await asyncio.sleep(p["halt_after_s"])
    wrote = _write_halt_file(p)
    try:
        await asyncio.wait_for(writer.drain(), 60)
        status = await asyncio.wait_for(reader.readline(), 60)
        upload = f"answered {status.decode().strip()!r}"
    except (OSError, TimeoutError, ssl.SSLError) as e:
        upload = f"failed: {type(e).__name__}"
    finally:
        writer.close()
    line = f"halt write {wrote}; upload {upload}"
    print(f"enf_async_upload {p['marker']}: {line}", file=sys.stderr, flush=True)
    return {"log": line}
