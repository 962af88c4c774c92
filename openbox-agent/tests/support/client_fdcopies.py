"""Descriptor copies and the positional and in-kernel transfer calls, against
tls_server.py --plain (HTTP/1.1, keep-alive, echo bodies).

Usage: client_fdcopies.py PORT OUTDIR

Scenarios:
  dup       one keep-alive connection, three requests: the first written through a
            dup2 copy (fd 200) and its answer read through the original; the second
            written through an fcntl(F_DUPFD_CLOEXEC, 300) copy, its answer read
            through the dup2 copy; then the original and those copies are closed and
            the third goes through an os.dup copy. Writes OUTDIR/dup.sent and
            OUTDIR/dup.received (every byte each way, in order) and OUTDIR/dup.fds.
  sendfile  POST /sendfile with a 50 000-byte body sent by os.sendfile from
            OUTDIR/body.bin after a head sent with sendall. Writes OUTDIR/sendfile.head
            and OUTDIR/sendfile.received.
  pread     os.pwrite/os.pwritev (and pwritev2 through a flag) then os.pread/os.preadv
            (and preadv2) on OUTDIR/pos.bin. Writes OUTDIR/pread.json: the bytes and
            calls each way.

Writes OUTDIR/ok when every answer was the expected one.
"""

import fcntl
import json
import os
import socket
import sys

TIMEOUT = 30
# Host header: 127.0.0.1:PORT, set in main.
HOST = b""


def read_response(fd_read):
    """One response (Content-Length framed), read with os.read on `fd_read`."""
    got = b""
    while b"\r\n\r\n" not in got:
        piece = os.read(fd_read, 65536)
        assert piece, "connection closed before the response head"
        got += piece
    head, _, body = got.partition(b"\r\n\r\n")
    length = int(
        [l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0]
    )
    while len(body) < length:
        piece = os.read(fd_read, 65536)
        assert piece, "connection closed in the response body"
        body += piece
    assert len(body) == length, "more than one response"
    return head + b"\r\n\r\n" + body


def request(path, body):
    return (
        b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (path, HOST, len(body))
        + body
    )


def write_all(fd, data):
    while data:
        n = os.write(fd, data)
        data = data[n:]


def dup(port, outdir):
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    s.settimeout(None)
    orig = s.fileno()
    sent, received = b"", b""

    copy2 = os.dup2(orig, 200)
    assert copy2 == 200
    req = request(b"/dup/one", b"first body")
    write_all(200, req)
    sent += req
    resp = read_response(orig)
    assert resp.endswith(b"echo:POST /dup/one 10"), resp
    received += resp

    copyf = fcntl.fcntl(orig, fcntl.F_DUPFD_CLOEXEC, 300)
    assert copyf >= 300
    req = request(b"/dup/two", b"second body!")
    write_all(copyf, req)
    sent += req
    resp = read_response(200)
    assert resp.endswith(b"echo:POST /dup/two 12"), resp
    received += resp

    copyd = os.dup(orig)
    s.detach()
    os.close(orig)
    os.close(200)
    os.close(copyf)
    req = request(b"/dup/three", b"third")
    write_all(copyd, req)
    sent += req
    resp = read_response(copyd)
    assert resp.endswith(b"echo:POST /dup/three 5"), resp
    received += resp
    os.close(copyd)

    with open(os.path.join(outdir, "dup.sent"), "wb") as f:
        f.write(sent)
    with open(os.path.join(outdir, "dup.received"), "wb") as f:
        f.write(received)
    with open(os.path.join(outdir, "dup.fds"), "w") as f:
        json.dump({"original": orig, "dup2": 200, "fcntl": copyf, "dup": copyd}, f)


def sendfile(port, outdir):
    path = os.path.join(outdir, "body.bin")
    body = bytes((i * 7) % 251 for i in range(50000))
    with open(path, "wb") as f:
        f.write(body)
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    s.settimeout(None)
    head = b"POST /sendfile HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (HOST, len(body))
    s.sendall(head)
    with open(path, "rb") as f:
        offset = 0
        while offset < len(body):
            n = os.sendfile(s.fileno(), f.fileno(), offset, len(body) - offset)
            assert n > 0
            offset += n
    resp = read_response(s.fileno())
    assert resp.endswith(b"echo:POST /sendfile 50000"), resp
    s.close()
    with open(os.path.join(outdir, "sendfile.head"), "wb") as f:
        f.write(head)
    with open(os.path.join(outdir, "sendfile.received"), "wb") as f:
        f.write(resp)


def pread(outdir):
    path = os.path.join(outdir, "pos.bin")
    written = reads = writes = read_bytes = 0
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    for data, off in [(b"x" * 1000, 0), (b"y" * 500, 4096)]:
        written += os.pwrite(fd, data, off)
        writes += 1
    written += os.pwritev(fd, [b"a" * 10, b"b" * 20], 100)
    writes += 1
    # A flag makes Python call pwritev2 / preadv2.
    written += os.pwritev(fd, [b"c" * 7], 200, os.RWF_DSYNC)
    writes += 1
    read_bytes += len(os.pread(fd, 700, 0))
    reads += 1
    bufs = [bytearray(30), bytearray(40)]
    read_bytes += os.preadv(fd, bufs, 4000)
    reads += 1
    try:
        read_bytes += os.preadv(fd, [bytearray(16)], 10, os.RWF_HIPRI)
        reads += 1
    except OSError:
        # Not supported on this file system: the check counts what was done.
        pass
    os.close(fd)
    with open(os.path.join(outdir, "pread.json"), "w") as f:
        json.dump(
            {"bytes_written": written, "writes": writes, "bytes_read": read_bytes, "reads": reads},
            f,
        )


def main():
    global HOST
    port, outdir = int(sys.argv[1]), sys.argv[2]
    HOST = b"127.0.0.1:%d" % port
    dup(port, outdir)
    sendfile(port, outdir)
    pread(outdir)
    open(os.path.join(outdir, "ok"), "w").close()


if __name__ == "__main__":
    main()
