"""Load from a process the agent does NOT watch: loopback socket writes (and the reads
of its in-process sink) and file reads, in a loop, until killed or SECONDS pass.

Usage: unwatched_load.py [SECONDS]   (default 30: a bound in case nobody stops it)
Prints "ready" once the loop runs, then a count of iterations at the end (on SIGTERM
or timeout).
"""

import os
import signal
import socket
import sys
import threading
import time

stop = threading.Event()


def sink(conn):
    with conn:
        while conn.recv(65536):
            pass


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    out = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    threading.Thread(target=sink, args=(conn,), daemon=True).start()
    payload = b"unwatched-load " * 8
    deadline = time.monotonic() + seconds
    iterations = 0
    print("ready", flush=True)
    while not stop.is_set() and time.monotonic() < deadline:
        out.send(payload)
        fd = os.open("/etc/hostname", os.O_RDONLY)
        os.read(fd, 4096)
        os.close(fd)
        iterations += 1
        if iterations % 100 == 0:
            time.sleep(0.01)  # leave the CPUs to the agent under test
    out.close()
    print(iterations, flush=True)


if __name__ == "__main__":
    main()
