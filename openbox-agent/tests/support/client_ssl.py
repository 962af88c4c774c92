"""One TLS connection (stdlib ssl + socket), two keep-alive requests: a GET, then a POST
with a 5000-byte body. Each request goes out in one sendall.

Usage: client_ssl.py PORT OUTDIR
Writes OUTDIR/sent.bin (every plaintext byte sent, in order), OUTDIR/received.bin
(every plaintext byte received) and OUTDIR/ok once both responses checked out.
"""

import os
import socket
import ssl
import sys


def request_bytes(port):
    host = f"127.0.0.1:{port}"
    get = (
        "GET /stdlib/first?marker=stdlib-get HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "User-Agent: openbox-test-stdlib\r\n"
        "Accept: */*\r\n"
        "\r\n"
    ).encode()
    body = b"".join(b"stdlib-body-%05d\n" % i for i in range(300))[:5000]
    post = (
        "POST /stdlib/post HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "User-Agent: openbox-test-stdlib\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    ).encode() + body
    return [get, post]


def read_response(sock, buf):
    """Reads one Content-Length response; returns (response bytes, leftover)."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise EOFError("server closed before the response head")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            raise EOFError("server closed inside the response body")
        rest += data
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


def main():
    port, outdir = int(sys.argv[1]), sys.argv[2]
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    requests = request_bytes(port)
    received = []
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            buf = b""
            for req in requests:
                tls.sendall(req)
                resp, buf = read_response(tls, buf)
                received.append(resp)
    assert received[0].endswith(b"echo:GET /stdlib/first?marker=stdlib-get 0"), received[0]
    assert received[1].endswith(b"echo:POST /stdlib/post 5000"), received[1]
    with open(os.path.join(outdir, "sent.bin"), "wb") as f:
        f.write(b"".join(requests))
    with open(os.path.join(outdir, "received.bin"), "wb") as f:
        f.write(b"".join(received))
    open(os.path.join(outdir, "ok"), "w").close()


if __name__ == "__main__":
    main()
