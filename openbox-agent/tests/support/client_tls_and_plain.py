"""One asyncio thread, two keep-alive connections: HTTPS (memory-BIO TLS, as asyncio
and aiohttp do it) and plain HTTP, one request on each in turn, until OUT/stop exists.

usage: client_tls_and_plain.py HTTPS_PORT HTTP_PORT OUT

Writes OUT/ready once both connections are open, and after each round OUT/rounds (the
number of rounds done), so a test can tell which requests were made while it watched.
"""

import asyncio
import itertools
import os
import ssl
import sys


async def get(reader, writer, path):
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    body = await reader.readexactly(length)
    if path.encode() not in body:
        raise SystemExit(f"response without the path {path}: {body[:200]!r}")


async def main(https_port, http_port, out):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    tls = await asyncio.open_connection("127.0.0.1", https_port, ssl=ctx)
    plain = await asyncio.open_connection("127.0.0.1", http_port)
    open(os.path.join(out, "ready"), "w").close()
    for i in itertools.count():
        if os.path.exists(os.path.join(out, "stop")):
            return
        await get(*tls, f"/json/tls-{i:05d}")
        await get(*plain, f"/json/plain-{i:05d}")
        with open(os.path.join(out, "rounds.tmp"), "w") as f:
            f.write(str(i + 1))
        os.replace(os.path.join(out, "rounds.tmp"), os.path.join(out, "rounds"))
        await asyncio.sleep(0.01)


asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
