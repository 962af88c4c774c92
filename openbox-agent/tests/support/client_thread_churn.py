"""A watched process whose threads come and go, and whose forked children exit, while it
keeps its connections: it stays watched, its TLS included, until it exits itself.

Usage: client_thread_churn.py PORT OUTDIR   (PORT: tls_server.py over HTTPS)

Five rounds on one keep-alive HTTPS connection of the main thread. Each round starts 16
threads that end together (every fourth makes a request on a connection of its own),
forks a child that exits at once and one that exits (os._exit) while 4 threads of its
own run, both holding the main connection's socket they inherited, then sends
`GET /churn/<round>` on the main connection. Writes OUTDIR/churn.json ({"pid",
"children", "requests"}) and OUTDIR/ok when every answer came.
"""

import http.client
import json
import os
import ssl
import sys
import threading
import time

ROUNDS = 5
THREADS = 16
CHILD_THREADS = 4


def get(conn, path):
    conn.request("GET", path)
    body = conn.getresponse().read()
    assert body == f"echo:GET {path} 0".encode(), body


def connect(port):
    return http.client.HTTPSConnection(
        "127.0.0.1", port, timeout=30, context=ssl._create_unverified_context()
    )


def threads_round(port, round_, requests):
    done = threading.Barrier(THREADS)
    failures = []

    def run(i):
        try:
            if i % 4 == 0:
                path = f"/thread/{round_}/{i}"
                conn = connect(port)
                get(conn, path)
                conn.close()
                requests.append(path)
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(repr(e))
        # Every thread of the round ends at about the same moment.
        done.wait()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


def fork_child(with_threads):
    pid = os.fork()
    if pid == 0:
        if with_threads:
            stop = threading.Event()
            for _ in range(CHILD_THREADS):
                threading.Thread(target=stop.wait, daemon=True).start()
            time.sleep(0.05)
        # Every thread of the child ends at once; the inherited socket is not touched.
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    return pid


def main():
    port, outdir = int(sys.argv[1]), sys.argv[2]
    main_conn = connect(port)
    requests, children = [], []
    get(main_conn, "/churn/start")
    requests.append("/churn/start")
    for round_ in range(ROUNDS):
        threads_round(port, round_, requests)
        children.append(fork_child(with_threads=False))
        children.append(fork_child(with_threads=True))
        path = f"/churn/{round_}"
        get(main_conn, path)
        requests.append(path)
    main_conn.close()
    with open(os.path.join(outdir, "churn.json"), "w") as f:
        json.dump({"pid": os.getpid(), "children": children, "requests": requests}, f)
    open(os.path.join(outdir, "ok"), "w").close()


if __name__ == "__main__":
    main()
