"""Socket I/O shapes the agent must reassemble exactly, over loopback TCP to an echo
server that runs inside this same process (so both ends are traced).

Usage: client_iovec.py OUTDIR

Scenarios, one TCP connection each (the connecting side sends, the accepting side
echoes every byte back as it reads it, the sender then reads the echo to EOF):
  short-writes  1..13-byte write()/send() calls; the echo side reads 1 byte per recv
                and sends each byte back alone; the sender reads the echo 5 bytes a call
  writev        os.writev with 4 iovecs (one empty) per call; the echo side reads with
                os.readv into 3/5/64-byte buffers and echoes with os.writev
  sendmsg       socket.sendmsg with 3 iovecs per call; the echo side reads with
                recvmsg_into into 7/11/50-byte buffers and echoes with sendmsg
  peek          every read on both sides preceded by a MSG_PEEK recv or recvmsg, whose
                bytes are read again (seen once)
  thread-00..15 16 threads at once, each with its own connection, 40 numbered messages
                sent with sendall; the echo side uses recv(4096)/sendall

Every payload starts with "<scenario>\\n", which is how the test finds its connection.
Writes OUTDIR/<scenario>.sent (the exact bytes the connecting side sent) per scenario
and OUTDIR/ok when every echo matched.
"""

import os
import socket
import struct
import sys
import threading

TIMEOUT = 60
THREADS = 16


def blocking_with_deadline(sock):
    # A Python socket timeout would make the fd O_NONBLOCK, and os.readv/os.writev on it
    # would then fail with EAGAIN. Kernel timeouts keep the calls blocking but bounded.
    sock.settimeout(None)
    limit = struct.pack("ll", TIMEOUT, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)


def listen():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(THREADS * 2)
    srv.settimeout(TIMEOUT)
    return srv


def echo_bytewise(conn):
    while True:
        b = conn.recv(1)
        if not b:
            return
        conn.sendall(b)


def echo_readv(conn):
    fd = conn.fileno()
    while True:
        bufs = [bytearray(3), bytearray(5), bytearray(64)]
        n = os.readv(fd, bufs)
        if n == 0:
            return
        pieces, left = [], n
        for b in bufs:
            take = min(left, len(b))
            pieces.append(bytes(b[:take]))
            left -= take
        pieces = [p for p in pieces if p]
        sent = os.writev(fd, pieces)
        assert sent == n, (sent, n)


def echo_recvmsg(conn):
    while True:
        bufs = [bytearray(7), bytearray(11), bytearray(50)]
        n, _, _, _ = conn.recvmsg_into(bufs)
        if n == 0:
            return
        pieces, left = [], n
        for b in bufs:
            take = min(left, len(b))
            pieces.append(bytes(b[:take]))
            left -= take
        sent = conn.sendmsg([p for p in pieces if p])
        assert sent == n, (sent, n)


def echo_peeking(conn):
    # Peeks before every read, as curl checks a connection's liveness (recv with
    # MSG_PEEK) and as parsers sniff a protocol (recvmsg with MSG_PEEK): peeked bytes stay
    # in the socket and are read again, so they must be seen once.
    i = 0
    while True:
        if i % 2:
            peeked, _, _, _ = conn.recvmsg(1 + i % 5, 0, socket.MSG_PEEK)
        else:
            peeked = conn.recv(1 + i % 3, socket.MSG_PEEK)
        data = conn.recv(4096)
        if not data:
            return
        assert data.startswith(peeked), (peeked, data)
        conn.sendall(data)
        i += 1


def peeking(s):
    sent = bytearray(b"peek\n")
    s.sendall(b"peek\n")
    for i in range(60):
        piece = b"pk%03d-" % i + b"q" * (1 + i % 11) + b"\n"
        s.sendall(piece)
        sent += piece
    return bytes(sent), "peek"


def echo_plain(conn):
    while True:
        data = conn.recv(4096)
        if not data:
            return
        conn.sendall(data)


def serve(srv, echo, count, errors):
    def one(conn):
        try:
            with conn:
                blocking_with_deadline(conn)
                echo(conn)
        except Exception as e:  # reported by the main thread
            errors.append(repr(e))

    threads = []
    for _ in range(count):
        conn, _ = srv.accept()
        t = threading.Thread(target=one, args=(conn,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()


def read_echo(sock, how, expected_len):
    got = bytearray()
    while True:
        if how == "recv5":
            data = sock.recv(5)
        elif how == "readv":
            bufs = [bytearray(4), bytearray(9)]
            n = os.readv(sock.fileno(), bufs)
            data = (bytes(bufs[0]) + bytes(bufs[1]))[:n]
        elif how == "recvmsg":
            data, _, _, _ = sock.recvmsg(13)
        elif how == "peek":
            sock.recv(2, socket.MSG_PEEK)
            data = sock.recv(7)
        else:
            data = sock.recv(65536)
        if not data:
            break
        got += data
        assert len(got) <= expected_len, "echo longer than what was sent"
    return bytes(got)


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    blocking_with_deadline(s)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def short_writes(s):
    sent = bytearray(b"short-writes\n")
    s.sendall(b"short-writes\n")
    fd = s.fileno()
    for i in range(150):
        size = 1 + i % 13
        piece = (b"%d:" % i + b"s" * size)[:size]
        n = os.write(fd, piece) if i % 2 else s.send(piece)
        assert n == len(piece), (n, len(piece))
        sent += piece
    return bytes(sent), "recv5"


def writev(s):
    sent = bytearray(b"writev\n")
    s.sendall(b"writev\n")
    fd = s.fileno()
    for i in range(60):
        iov = [
            b"wv%03d-a|" % i,
            b"",
            b"b" * (1 + i % 17) + b"|",
            b"c" * (3 + (i * 7) % 40) + b"\n",
        ]
        n = os.writev(fd, iov)
        assert n == sum(map(len, iov)), n
        sent += b"".join(iov)
    return bytes(sent), "readv"


def sendmsg(s):
    sent = bytearray(b"sendmsg\n")
    s.sendall(b"sendmsg\n")
    for i in range(60):
        iov = [b"sm%03d-" % i, b"x" * (1 + (i * 5) % 29), b"-y" * (1 + i % 6) + b"\n"]
        n = s.sendmsg(iov)
        assert n == sum(map(len, iov)), n
        sent += b"".join(iov)
    return bytes(sent), "recvmsg"


def run_single(outdir, name, echo, send):
    errors = []
    srv = listen()
    server = threading.Thread(target=serve, args=(srv, echo, 1, errors))
    server.start()
    with connect(srv.getsockname()[1]) as s:
        sent, how = send(s)
        s.shutdown(socket.SHUT_WR)
        echoed = read_echo(s, how, len(sent))
    server.join()
    srv.close()
    assert not errors, errors
    assert echoed == sent, f"{name}: echo differs"
    with open(os.path.join(outdir, f"{name}.sent"), "wb") as f:
        f.write(sent)


def run_threads(outdir):
    errors = []
    srv = listen()
    port = srv.getsockname()[1]
    server = threading.Thread(target=serve, args=(srv, echo_plain, THREADS, errors))
    server.start()
    results = {}
    start = threading.Barrier(THREADS)

    def client(k):
        try:
            name = "thread-%02d" % k
            sent = bytearray(name.encode() + b"\n")
            with connect(port) as s:
                start.wait(TIMEOUT)
                s.sendall(bytes(sent))
                for m in range(40):
                    msg = b"%s msg-%02d %s\n" % (
                        name.encode(),
                        m,
                        b"p" * ((k * 13 + m * 7) % 50),
                    )
                    s.sendall(msg)
                    sent += msg
                s.shutdown(socket.SHUT_WR)
                echoed = read_echo(s, "plain", len(sent))
            assert echoed == bytes(sent), f"{name}: echo differs"
            results[name] = bytes(sent)
        except Exception as e:
            errors.append(repr(e))

    clients = [threading.Thread(target=client, args=(k,)) for k in range(THREADS)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    server.join()
    srv.close()
    assert not errors, errors
    for name, sent in results.items():
        with open(os.path.join(outdir, f"{name}.sent"), "wb") as f:
            f.write(sent)


def main():
    outdir = sys.argv[1]
    run_single(outdir, "short-writes", echo_bytewise, short_writes)
    run_single(outdir, "writev", echo_readv, writev)
    run_single(outdir, "sendmsg", echo_recvmsg, sendmsg)
    run_single(outdir, "peek", echo_peeking, peeking)
    run_threads(outdir)
    open(os.path.join(outdir, "ok"), "w").close()


if __name__ == "__main__":
    main()
