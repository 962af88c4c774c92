"""Records the traffic `cargo xtask bench` replays through the parsers: each protocol's
test client runs against a real server under `openbox-agent trace --raw --json`, and
the capture records (connections and data) are kept in benches/traffic/<protocol>.jsonl.

Run as root after `cargo xtask build` and `cargo xtask setup-env`, with the variables
setup-env prints (OPENBOX_TEST_PYTHON, OPENBOX_TEST_SUPPORT, server paths):
    python3 openbox-agent/benches/record.py
"""

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
AGENT = os.environ.get("OPENBOX_AGENT_BIN", os.path.join(ROOT, "target/release/openbox-agent"))
PY = os.environ["OPENBOX_TEST_PYTHON"]
SUPPORT = os.environ["OPENBOX_TEST_SUPPORT"]
ROUNDS = 20


def start(script, *args):
    p = subprocess.Popen([PY, os.path.join(SUPPORT, script), *args], stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline())


def record(name, client_args):
    """Runs the client ROUNDS times in one traced shell loop; keeps connection records."""
    keep = []
    with tempfile.TemporaryDirectory() as out:
        # Later rounds may hit errors (a row inserted by the first): real traffic too.
        loop = " ; ".join([" ".join([PY, os.path.join(SUPPORT, client_args[0]), *client_args[1:], out])] * ROUNDS) + " ; true"
        run = subprocess.run([AGENT, "trace", "--raw", "--json", "--", "sh", "-c", loop],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True, text=True)
    for line in run.stdout.splitlines():
        r = json.loads(line)
        if r["type"] in ("connect", "accept", "data", "close") and r.get("conn"):
            keep.append(line)
    path = os.path.join(HERE, "traffic", f"{name}.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(keep) + "\n")
    print(f"{path}: {len(keep)} records")


def main():
    servers = []
    try:
        http, hport = start("tls_server.py", "--plain")
        servers.append(http)
        record("http", ["client_http.py", "httpx", f"http://127.0.0.1:{hport}"])
        pg, pport = start("pg_server.py", "--allow-plain")
        servers.append(pg)
        record("postgres", ["client_pg.py", "psycopg2", str(pport)])
        my, mport = start("mariadb_server.py")
        servers.append(my)
        record("mysql", ["client_mysql.py", str(mport)])
        rd, rport = start("redis_server.py")
        servers.append(rd)
        record("redis", ["client_redis.py", "pipeline", str(rport)])
        mg, gport = start("ferretdb_server.py")
        servers.append(mg)
        record("mongo", ["client_mongo.py", str(gport)])
    finally:
        for s in servers:
            s.terminate()
            s.wait()


if __name__ == "__main__":
    sys.exit(main())
