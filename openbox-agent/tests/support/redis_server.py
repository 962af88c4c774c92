"""A throwaway Redis server on 127.0.0.1: no persistence, data in a temp dir.

Usage: redis_server.py [--redis-server PATH] [PORT]

PATH defaults to $OPENBOX_REDIS_SERVER, else `redis-server` on PATH. PORT 0 (the default)
picks a free port. Prints the port as the first stdout line once the server answers
PING. SIGTERM or SIGINT stops it and deletes the temp dir.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import fixture




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
    fixture.handle_signals()

    port = args.port or fixture.free_port()
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
        log_path = os.path.join(top, "redis.log")
        if not fixture.wait_until_answering("redis_server", server, log_path, lambda: pings(port), 30):
            return
        fixture.serve_until_stopped("redis_server", server, port, log_path)
    finally:
        fixture.stop(server, 20)
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
