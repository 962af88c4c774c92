"""A throwaway Redis server on 127.0.0.1: no persistence, data in a temp dir.

Usage: redis_server.py [--redis-server PATH] [PORT]

PATH defaults to $OPENBOX_REDIS_SERVER, else `redis-server` on PATH. PORT 0 (the default)
picks a free port. Prints the port as the first stdout line once the server answers
PING. SIGTERM or SIGINT stops it and deletes the temp dir.
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

stopping = False


def on_signal(*_):
    global stopping
    stopping = True


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pings(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-server", default=os.environ.get("OPENBOX_REDIS_SERVER", "redis-server"))
    parser.add_argument("port", nargs="?", type=int, default=0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    port = args.port or free_port()
    top = tempfile.mkdtemp(prefix="openbox-redis-")
    server = None
    try:
        log = open(os.path.join(top, "redis.log"), "wb")
        try:
            server = subprocess.Popen(
                [args.redis_server, "--port", str(port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", top, "--daemonize", "no",
                 "--protected-mode", "yes", "--databases", "16"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=top,
            )
        except FileNotFoundError:
            sys.exit(f"redis_server: {args.redis_server} not found: apt-get install redis-server (or run `cargo xtask setup-env`)")
        deadline = time.monotonic() + 30
        while not pings(port):
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                sys.stderr.write(open(os.path.join(top, "redis.log")).read())
                sys.exit("redis_server: Redis did not start")
            if stopping:
                return
            time.sleep(0.05)
        print(port, flush=True)
        while not stopping and server.poll() is None:
            time.sleep(0.2)
        if server.poll() is not None and not stopping:
            sys.stderr.write(open(os.path.join(top, "redis.log")).read())
            sys.exit("redis_server: Redis exited unexpectedly")
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
