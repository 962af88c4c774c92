"""Two HTTPS clients in one process, each on one keep-alive connection to the same
server, one request after another with short idle pauses, until OUT/stop exists:

- aiohttp (memory-BIO TLS: the ssl module encrypts into a buffer the event loop
  writes), on the main thread, paths /echo/aio-<n>;
- requests.Session (socket-BIO TLS: OpenSSL reads and writes the socket itself), on a
  second thread, paths /echo/sync-<n>.

usage: client_keepalive_tls.py HTTPS_PORT OUT

Each response must echo its request's path (tls_server.py answers
"echo:GET <path> 0"); the client stops with an error otherwise. After each request,
OUT/rounds-aio and OUT/rounds-sync hold the number of requests that client has made,
so a test can tell which were made while it watched. Each pool holds one connection
(the test checks with the server that there were two in all).
"""

import asyncio
import itertools
import os
import sys
import threading
import time

import aiohttp
import requests
import urllib3

PAUSE = 0.01


def count(out, name, n):
    tmp = os.path.join(out, f"rounds-{name}.tmp")
    with open(tmp, "w") as f:
        f.write(str(n))
    os.replace(tmp, os.path.join(out, f"rounds-{name}"))


def check(path, body):
    if body != f"echo:GET {path} 0":
        raise SystemExit(f"response to {path} is {body[:200]!r}")


def sync_client(base, out, failed):
    try:
        urllib3.disable_warnings()
        session = requests.Session()
        session.mount(
            "https://",
            requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=1),
        )
        for i in itertools.count():
            if os.path.exists(os.path.join(out, "stop")):
                return
            path = f"/echo/sync-{i:05d}"
            r = session.get(base + path, verify=False)
            check(path, r.text)
            count(out, "sync", i + 1)
            time.sleep(PAUSE)
    except BaseException as e:  # noqa: BLE001 - reported by the main thread
        failed.append(e)


async def aio_client(base, out):
    connector = aiohttp.TCPConnector(limit=1, ssl=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in itertools.count():
            if os.path.exists(os.path.join(out, "stop")):
                break
            path = f"/echo/aio-{i:05d}"
            async with session.get(base + path) as r:
                check(path, await r.text())
            count(out, "aio", i + 1)
            await asyncio.sleep(PAUSE)


def main(port, out):
    base = f"https://127.0.0.1:{port}"
    failed = []
    thread = threading.Thread(target=sync_client, args=(base, out, failed))
    thread.start()
    asyncio.run(aio_client(base, out))
    thread.join()
    if failed:
        raise failed[0]
    open(os.path.join(out, "ok"), "w").close()


main(int(sys.argv[1]), sys.argv[2])
