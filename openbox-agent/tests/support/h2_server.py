"""HTTP/2 test server on 127.0.0.1: hypercorn serving a small ASGI echo application.

Usage: h2_server.py [--tls]

The chosen port is the first line on stdout. With --tls: HTTPS with a self-signed
certificate, ALPN offering h2 and http/1.1. Without: cleartext, where hypercorn speaks
HTTP/1.1, HTTP/2 with prior knowledge (the client starts with the connection preface)
and HTTP/2 after an `Upgrade: h2c` request (101 Switching Protocols, then the upgraded
request is answered on stream 1).

Every answer is deterministic (hypercorn's own `date` and `server` headers are turned
off):
    /echo/<rest>          200, application/json
                          {"method": …, "path": …, "http_version": …, "body": <the request
                          body as text>}, plus `x-echo-length: <request body length>`
    /status/<code>/<rest> <code>, text/plain body "status:<code> <path>"
    /big/<n>              200, text/plain body of n bytes (a repeating a-z pattern)
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from hypercorn.asyncio import serve
from hypercorn.config import Config


def make_cert(directory):
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return cert, key


async def read_body(receive):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = await read_body(receive)
    path = scope["path"]
    parts = path.strip("/").split("/")
    headers = []
    if parts[0] == "status" and len(parts) > 1 and parts[1].isdigit():
        status = int(parts[1])
        answer = f"status:{status} {path}".encode()
        headers.append((b"content-type", b"text/plain"))
    elif parts[0] == "big" and len(parts) > 1 and parts[1].isdigit():
        status = 200
        n = int(parts[1])
        pattern = b"abcdefghijklmnopqrstuvwxyz"
        answer = (pattern * (n // len(pattern) + 1))[:n]
        headers.append((b"content-type", b"text/plain"))
    else:
        status = 200
        answer = json.dumps(
            {
                "method": scope["method"],
                "path": path,
                "http_version": scope["http_version"],
                "body": body.decode("utf-8", "replace"),
            }
        ).encode()
        headers.append((b"content-type", b"application/json"))
        headers.append((b"x-echo-length", str(len(body)).encode()))
    headers.append((b"content-length", str(len(answer)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tls", action="store_true")
    args = ap.parse_args()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.set_inheritable(True)

    config = Config()
    # hypercorn binds what it is given; an inherited descriptor lets us choose a free
    # port and print it before serving.
    config.bind = [f"fd://{sock.fileno()}"]
    config.include_date_header = False
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    certdir = tempfile.mkdtemp(prefix="openbox-h2-server-")
    if args.tls:
        config.certfile, config.keyfile = make_cert(certdir)
        config.alpn_protocols = ["h2", "http/1.1"]

    shutdown = asyncio.Event()

    async def run():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, shutdown.set)
        loop.add_signal_handler(signal.SIGINT, shutdown.set)
        await serve(app, config, shutdown_trigger=shutdown.wait)

    print(sock.getsockname()[1], flush=True)
    try:
        asyncio.run(run())
    finally:
        shutil.rmtree(certdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
