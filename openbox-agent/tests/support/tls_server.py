"""HTTP/1.1 test server on 127.0.0.1, HTTPS with a self-signed certificate by default.

Usage: tls_server.py [--plain] [--record DIR] [PORT]

PORT 0 (the default) picks a free port. The chosen port is the first line on stdout.
Keep-alive; TCP_NODELAY; bodies by Content-Length or chunked, up to several MiB.

A request with `Expect: 100-continue` gets an interim `100 Continue` before its body is
read. HEAD gets the headers GET would get (Content-Length included) and no body.

Every response is deterministic (no Date header):
    HTTP/1.1 200 OK / Content-Type: text/plain / Content-Length: N
    body: "echo:<method> <path> <body length>"
`GET /bytes/<n>` answers a body of n bytes (a repeating a-z pattern) instead.
`/slow/<ms>/<rest>` answers the echo body in two writes <ms> milliseconds apart (the
head and half the body, then the rest): a response that is on its way for a while.
`/trickle/<ms>/<rest>` reads the request's body 16 KiB at a time, <ms> milliseconds
apart (a slow reader: a large upload stays on its way for a while), then echoes.
Other paths with their own answer (any method; `<rest>` is free text, e.g. a marker):
    /status/<code>/<rest>  status <code> (its standard reason phrase), text/plain body
                           "status:<code> <method> <path>"
    /json/<rest>           application/json body {"method": …, "path": …, "body_len": …}
    POST /v1/chat/completions  an LLM chat-completions style JSON answer quoting the
                           last message's content ("Answer to: <content>")
    /binary/<n>            application/octet-stream body of n bytes 0x00..0xff repeating
    /chunked/<rest>        Transfer-Encoding: chunked, text/plain, three chunks joined:
                           "part1:<path>|part2|part3"
    /cookie/<rest>         the echo body, plus `Set-Cookie: session=s3cr3t` and
                           `X-Marker: <rest>` response headers

--record DIR writes, per connection, the plaintext bytes received and sent:
DIR/conn-<k>.in and DIR/conn-<k>.out (k = accept order, from 0). Each piece is
appended before the server acts on it (received bytes before the response is built,
response bytes before they are sent), so once a client has its response, the files
hold everything up to it.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from http import HTTPStatus

MAX_HEADER = 64 * 1024


def make_cert(directory):
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return cert, key


class Recorder:
    def __init__(self, directory, index):
        self.files = None
        if directory:
            self.files = {
                d: open(os.path.join(directory, f"conn-{index}.{d}"), "wb") for d in ("in", "out")
            }

    def add(self, direction, data):
        if self.files and data:
            f = self.files[direction]
            f.write(data)
            f.flush()

    def close(self):
        if self.files:
            for f in self.files.values():
                f.close()


class Conn:
    """Buffered reader over a (TLS) socket that records what it receives."""

    def __init__(self, sock, recorder):
        self.sock = sock
        self.rec = recorder
        self.buf = bytearray()
        # Seconds between reads of 16 KiB, or 0 (full speed): `/trickle/`.
        self.pace = 0.0

    def fill(self):
        if self.pace:
            time.sleep(self.pace)
        data = self.sock.recv(16 * 1024 if self.pace else 256 * 1024)
        if not data:
            return False
        self.rec.add("in", data)
        self.buf += data
        return True

    def read_until(self, sep, limit):
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[: i + len(sep)])
                del self.buf[: i + len(sep)]
                return out
            if len(self.buf) > limit:
                raise ValueError("header too long")
            if not self.fill():
                return None

    def read_exact(self, n):
        while len(self.buf) < n:
            if not self.fill():
                raise EOFError("connection closed inside a body")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


def read_body(conn, headers):
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            line = conn.read_until(b"\r\n", MAX_HEADER)
            if line is None:
                raise EOFError("connection closed inside a chunked body")
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers up to the empty line
                    t = conn.read_until(b"\r\n", MAX_HEADER)
                    if t is None or t == b"\r\n":
                        return bytes(body)
            body += conn.read_exact(size)
            conn.read_exact(2)
    n = int(headers.get("content-length", "0") or "0")
    return conn.read_exact(n)


def chat_completion(body):
    """An answer shaped like an LLM chat-completions API's, deterministic: it quotes the
    last user message back."""
    try:
        request = json.loads(body or b"{}")
        messages = request.get("messages") or [{}]
        prompt = str(messages[-1].get("content", ""))
        model = str(request.get("model", "local-model"))
    except (ValueError, AttributeError):
        prompt, model = "", "local-model"
    return {
        "id": "chatcmpl-local",
        "object": "chat.completion",
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": f"Answer to: {prompt[:200]}"},
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 4,
                  "total_tokens": len(prompt.split()) + 4},
    }


def response_for(method, path, body):
    status, ctype, extra = "200 OK", "text/plain", ""
    if method == "GET" and path.startswith("/bytes/"):
        n = int(path[len("/bytes/"):])
        pattern = b"abcdefghijklmnopqrstuvwxyz"
        payload = (pattern * (n // len(pattern) + 1))[:n]
    elif path.startswith("/status/"):
        code = int(path.split("/")[2])
        status = f"{code} {HTTPStatus(code).phrase}"
        payload = f"status:{code} {method} {path}".encode()
    elif path.startswith("/json/"):
        ctype = "application/json"
        payload = json.dumps({"method": method, "path": path, "body_len": len(body)}).encode()
    elif method == "POST" and path.startswith("/v1/chat/completions"):
        ctype = "application/json"
        payload = json.dumps(chat_completion(body)).encode()
    elif path.startswith("/binary/"):
        ctype = "application/octet-stream"
        n = int(path.split("/")[2])
        payload = bytes(i % 256 for i in range(n))
    elif path.startswith("/chunked/"):
        parts = [f"part1:{path}|".encode(), b"part2|", b"part3"]
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        head = (
            "HTTP/1.1 200 OK\r\n"
            "Content-Type: text/plain\r\n"
            "Transfer-Encoding: chunked\r\n"
            "\r\n"
        ).encode()
        return head + chunked
    else:
        if path.startswith("/cookie/"):
            extra = f"Set-Cookie: session=s3cr3t\r\nX-Marker: {path[len('/cookie/'):]}\r\n"
        payload = f"echo:{method} {path} {len(body)}".encode()
    head = (
        f"HTTP/1.1 {status}\r\n"
        f"Content-Type: {ctype}\r\n"
        f"{extra}"
        f"Content-Length: {len(payload)}\r\n"
        "\r\n"
    ).encode()
    return head + payload


def serve_connection(sock, context, record_dir, index):
    rec = Recorder(record_dir, index)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            sock = context.wrap_socket(sock, server_side=True)
        conn = Conn(sock, rec)
        while True:
            head = conn.read_until(b"\r\n\r\n", MAX_HEADER)
            if head is None:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path, version = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            if headers.get("expect", "").lower() == "100-continue":
                interim = b"HTTP/1.1 100 Continue\r\n\r\n"
                rec.add("out", interim)
                sock.sendall(interim)
            if path.startswith("/trickle/"):
                conn.pace = int(path.split("/")[2]) / 1000
            body = read_body(conn, headers)
            conn.pace = 0.0
            response = response_for(method, path, body)
            if method == "HEAD":
                # The headers a GET would get (Content-Length included), no body.
                response = response_for("GET", path, body).split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
            rec.add("out", response)
            if path.startswith("/slow/") and method != "HEAD":
                delay = int(path.split("/")[2]) / 1000
                half = len(response) - (len(response) - response.index(b"\r\n\r\n") - 4) // 2
                sock.sendall(response[:half])
                time.sleep(delay)
                response = response[half:]
            sock.sendall(response)
            connection = headers.get("connection", "").lower()
            if connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive"):
                return
    except (OSError, ValueError, EOFError, ssl.SSLError) as e:
        print(f"tls_server: connection {index}: {e!r}", file=sys.stderr)
    finally:
        rec.close()
        try:
            sock.close()
        except OSError:
            pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--plain", action="store_true", help="plain HTTP instead of HTTPS")
    parser.add_argument("--record", metavar="DIR", help="record each connection's plaintext")
    parser.add_argument("port", nargs="?", type=int, default=0)
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    certdir = tempfile.mkdtemp(prefix="openbox-tls-server-")
    try:
        context = None
        if not args.plain:
            cert, key = make_cert(certdir)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            context.set_alpn_protocols(["http/1.1"])
        if args.record:
            os.makedirs(args.record, exist_ok=True)

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", args.port))
        listener.listen(128)
        print(listener.getsockname()[1], flush=True)

        index = 0
        while True:
            sock, _ = listener.accept()
            # The handshake runs on the connection's thread so a slow client cannot
            # stall accept().
            threading.Thread(
                target=serve_connection, args=(sock, context, args.record, index), daemon=True
            ).start()
            index += 1
    except KeyboardInterrupt:
        pass
    finally:
        shutil.rmtree(certdir, ignore_errors=True)


if __name__ == "__main__":
    main()
