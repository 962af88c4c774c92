"""A throwaway MongoDB-wire-protocol server on 127.0.0.1: FerretDB v1, SQLite backend.

Usage: ferretdb_server.py [--ferretdb PATH] [PORT]

PATH defaults to $OPENBOX_FERRETDB_BIN (set by `cargo xtask setup-env`). PORT 0 (the
default) picks a free port. The SQLite files and FerretDB's state live in a temp dir;
telemetry is off and the debug HTTP listener is on another free 127.0.0.1 port. Prints
the port as the first stdout line once the server answers a `hello`-style `isMaster`
(OP_QUERY on admin.$cmd). No authentication. SIGTERM or SIGINT stops it and deletes
the temp dir.
"""

import argparse
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile

import fixture




def bson_int_doc(key, value):
    """{key: int32 value} as BSON."""
    body = b"\x10" + key.encode() + b"\x00" + struct.pack("<i", value)
    return struct.pack("<i", len(body) + 5) + body + b"\x00"


def answers(port):
    """An OP_QUERY isMaster, the legacy handshake every server version answers."""
    query = bson_int_doc("isMaster", 1)
    body = struct.pack("<i", 0) + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1) + query
    msg = struct.pack("<iiii", 16 + len(body), 1, 0, 2004) + body
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(msg)
            head = s.recv(16)
            return len(head) == 16 and struct.unpack("<iiii", head)[3] == 1
    except OSError:
        return False


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ferretdb", default=os.environ.get("OPENBOX_FERRETDB_BIN"))
    parser.add_argument("port", nargs="?", type=int, default=0)
    args = parser.parse_args()
    if not args.ferretdb or not os.path.exists(args.ferretdb):
        sys.exit("ferretdb_server: no FerretDB binary: pass --ferretdb or set OPENBOX_FERRETDB_BIN (run `cargo xtask setup-env`)")
    fixture.handle_signals()

    port = args.port or fixture.free_port()
    top = tempfile.mkdtemp(prefix="openbox-ferretdb-")
    data = os.path.join(top, "data")
    os.makedirs(data)
    server = None
    try:
        log = open(os.path.join(top, "ferretdb.log"), "wb")
        server = subprocess.Popen(
            [args.ferretdb, "--handler=sqlite", f"--sqlite-url=file:{data}/",
             f"--listen-addr=127.0.0.1:{port}", f"--debug-addr=127.0.0.1:{fixture.free_port()}",
             f"--state-dir={top}", "--telemetry=disable", "--log-level=WARN"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=top,
            env={**os.environ, "DO_NOT_TRACK": "1"},
        )
        log_path = os.path.join(top, "ferretdb.log")
        if not fixture.wait_until_answering("ferretdb_server", server, log_path, lambda: answers(port), 30):
            return
        fixture.serve_until_stopped("ferretdb_server", server, port, log_path)
    finally:
        fixture.stop(server, 20)
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
