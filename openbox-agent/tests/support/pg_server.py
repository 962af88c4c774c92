"""A throwaway PostgreSQL cluster on 127.0.0.1 that accepts TLS connections only.

Usage (as root): pg_server.py [--pg-bin DIR] [--allow-plain] [PORT]

DIR defaults to $OPENBOX_PG_BIN, else the newest /usr/lib/postgresql/<ver>/bin. PORT 0
(the default) picks a free port; any fixed port works too (e.g. 6543). Prints the port as
the first stdout line once the server accepts connections. Log in as user `postgres`,
database `postgres`, no password (trust), over TLS only (`sslmode=require`): non-TLS TCP
connections are rejected unless --allow-plain is given (then both are accepted).
Also there: role `openbox` (password `openbox-pw`, trust) owning database `shop` with
table `items(id int primary key, name text)` holding (1,'apple'), (2,'banana'),
(3,'cherry').
SIGTERM or SIGINT stops the server (fast shutdown) and deletes the cluster.

PostgreSQL refuses to run as root, so initdb runs under `runuser -u postgres`, and the
postmaster is started directly as that user (subprocess `user=`) so that this script
holds the postmaster's own pid to signal.
"""

import argparse
import ctypes
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

stopping = False

SETUP = """
CREATE ROLE openbox LOGIN PASSWORD 'openbox-pw';
CREATE DATABASE shop OWNER openbox;
\\connect shop
SET ROLE openbox;
CREATE TABLE items (id int PRIMARY KEY, name text);
INSERT INTO items VALUES (1, 'apple'), (2, 'banana'), (3, 'cherry');
"""


def on_signal(*_):
    global stopping
    stopping = True


def pg_bin_dir(arg):
    if arg:
        return arg
    if os.environ.get("OPENBOX_PG_BIN"):
        return os.environ["OPENBOX_PG_BIN"]
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.split("/")[4].split(".")],
    )
    if not found:
        sys.exit("pg_server: no PostgreSQL server binaries: apt-get install postgresql (or run `cargo xtask setup-env`)")
    return os.path.dirname(found[-1])


def die_with_parent():
    # Runs in the child after its uid change (which would clear it): if this script is
    # killed outright, the postmaster still gets a fast shutdown.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pg-bin")
    parser.add_argument("--allow-plain", action="store_true", help="accept non-TLS TCP connections too")
    parser.add_argument("port", nargs="?", type=int, default=0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("pg_server: run as root (it starts PostgreSQL as the postgres user)")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    bindir = pg_bin_dir(args.pg_bin)
    pg = pwd.getpwnam("postgres")
    port = args.port or free_port()
    top = tempfile.mkdtemp(prefix="openbox-pg-")
    postmaster = None
    try:
        os.chmod(top, 0o700)
        os.chown(top, pg.pw_uid, pg.pw_gid)
        data = os.path.join(top, "data")
        subprocess.run(
            ["runuser", "-u", "postgres", "--", os.path.join(bindir, "initdb"),
             "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        cert, key = os.path.join(data, "server.crt"), os.path.join(data, "server.key")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for path in (cert, key):
            os.chown(path, pg.pw_uid, pg.pw_gid)
        os.chmod(key, 0o600)
        with open(os.path.join(data, "postgresql.conf"), "a") as f:
            f.write(
                "\n# openbox test cluster\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {port}\n"
                f"unix_socket_directories = '{top}'\n"
                "ssl = on\n"
                "ssl_cert_file = 'server.crt'\n"
                "ssl_key_file = 'server.key'\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "max_connections = 20\n"
                "shared_buffers = 16MB\n"
            )
        with open(os.path.join(data, "pg_hba.conf"), "w") as f:
            f.write(
                "local all all trust\n"
                "hostssl all all 127.0.0.1/32 trust\n"
                + ("hostnossl all all 127.0.0.1/32 trust\n" if args.allow_plain
                   else "hostnossl all all 127.0.0.1/32 reject\n")
            )
        log = open(os.path.join(top, "postgres.log"), "wb")
        postmaster = subprocess.Popen(
            [os.path.join(bindir, "postgres"), "-D", data],
            user=pg.pw_uid, group=pg.pw_gid, extra_groups=[],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=top,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + 60
        while True:
            if postmaster.poll() is not None or time.monotonic() > deadline:
                log.flush()
                sys.stderr.write(open(os.path.join(top, "postgres.log")).read())
                sys.exit("pg_server: PostgreSQL did not start")
            ready = subprocess.run(
                [os.path.join(bindir, "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            if ready.returncode == 0:
                break
            if stopping:
                return
            time.sleep(0.1)
        subprocess.run(
            [os.path.join(bindir, "psql"), "-q", "-v", "ON_ERROR_STOP=1", "-h", top, "-p", str(port),
             "-U", "postgres", "-d", "postgres", "-f", "-"],
            input=SETUP.encode(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        print(port, flush=True)
        while not stopping and postmaster.poll() is None:
            time.sleep(0.2)
        if postmaster.poll() is not None and not stopping:
            sys.stderr.write(open(os.path.join(top, "postgres.log")).read())
            sys.exit("pg_server: PostgreSQL exited unexpectedly")
    except subprocess.CalledProcessError as e:
        sys.exit(f"pg_server: {e}: {(e.stderr or b'').decode(errors='replace')}")
    finally:
        if postmaster is not None and postmaster.poll() is None:
            postmaster.send_signal(signal.SIGINT)  # fast shutdown
            try:
                postmaster.wait(timeout=20)
            except subprocess.TimeoutExpired:
                postmaster.kill()
                postmaster.wait()
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
