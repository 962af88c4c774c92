"""Three pipelined HTTP/1.1 requests: written in ONE send on a raw socket, before any
response is read; then the three responses are read back in order.

Usage: client_http_pipeline.py PORT OUTDIR
Requests: GET /pipe/one, POST /pipe/two (body "pipelined-body"), GET /status/404/pipe-three.
tls_server.py answers in order; each body names its request's method and path.
Writes OUTDIR/result.json: [{"status", "body"}] in order.
"""

import json
import os
import socket
import sys


def read_response(f):
    status_line = f.readline().decode()
    status = int(status_line.split(" ")[1])
    length = 0
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        name, value = line.decode().split(":", 1)
        if name.strip().lower() == "content-length":
            length = int(value)
    return {"status": status, "body": f.read(length).decode()}


def main():
    port, outdir = int(sys.argv[1]), sys.argv[2]
    host = f"127.0.0.1:{port}"
    body = b"pipelined-body"
    batch = (
        f"GET /pipe/one HTTP/1.1\r\nHost: {host}\r\n\r\n"
        f"POST /pipe/two HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body + (
        f"GET /status/404/pipe-three HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(batch)
        f = s.makefile("rb")
        out = [read_response(f) for _ in range(3)]
    assert [r["status"] for r in out] == [200, 200, 404], out
    with open(os.path.join(outdir, "result.json"), "w") as fo:
        json.dump(out, fo)


if __name__ == "__main__":
    main()
