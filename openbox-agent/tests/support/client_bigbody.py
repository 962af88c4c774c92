"""POSTs a 1 MiB body over plain HTTP: head and body in one sendall, so the first
write call carries far more than the agent's per-call capture limit.

Usage: client_bigbody.py PORT OUTDIR
Writes OUTDIR/sent.bin (the exact request bytes), OUTDIR/received.bin (the response)
and OUTDIR/ok once the response checked out.
"""

import os
import socket
import sys

BODY_LEN = 1 << 20


def body():
    line_count = BODY_LEN // 16 + 1
    return b"".join(b"bigbody-%07d\n" % i for i in range(line_count))[:BODY_LEN]


def main():
    port, outdir = int(sys.argv[1]), sys.argv[2]
    payload = body()
    request = (
        "POST /bigbody HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(payload)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode() + payload
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(60)
        s.sendall(request)
        response = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            response += data
    assert response.endswith(f"echo:POST /bigbody {BODY_LEN}".encode()), response
    with open(os.path.join(outdir, "sent.bin"), "wb") as f:
        f.write(request)
    with open(os.path.join(outdir, "received.bin"), "wb") as f:
        f.write(response)
    open(os.path.join(outdir, "ok"), "w").close()


if __name__ == "__main__":
    main()
