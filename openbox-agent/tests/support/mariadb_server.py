"""A throwaway MariaDB server on 127.0.0.1 with a known user and database.

Usage (as root): mariadb_server.py [--bin-dir DIR] [PORT]

DIR holds mariadbd (default: $OPENBOX_MARIADB_BIN_DIR, else /usr/sbin); mariadb-install-db
and the `mariadb` client come from PATH. PORT 0 (the default) picks a free port. Prints
the port as the first stdout line once the server accepts connections.

Log in as user `openbox`, password `openbox-pw`, database `shop` (TCP, no TLS), which
holds table `items(id INT PRIMARY KEY, name VARCHAR(64))` with rows (1,'apple'),
(2,'banana'), (3,'cherry'). SIGTERM or SIGINT stops the server and deletes its data.
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

BOOTSTRAP = """
CREATE DATABASE shop;
CREATE USER 'openbox'@'127.0.0.1' IDENTIFIED BY 'openbox-pw';
CREATE USER 'openbox'@'localhost' IDENTIFIED BY 'openbox-pw';
GRANT ALL ON shop.* TO 'openbox'@'127.0.0.1';
GRANT ALL ON shop.* TO 'openbox'@'localhost';
CREATE TABLE shop.items (id INT PRIMARY KEY, name VARCHAR(64));
INSERT INTO shop.items VALUES (1, 'apple'), (2, 'banana'), (3, 'cherry');
"""


def on_signal(*_):
    global stopping
    stopping = True


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", default=os.environ.get("OPENBOX_MARIADB_BIN_DIR", "/usr/sbin"))
    parser.add_argument("port", nargs="?", type=int, default=0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("mariadb_server: run as root (mariadbd runs with --user=root)")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    mariadbd = os.path.join(args.bin_dir, "mariadbd")
    if not os.path.exists(mariadbd):
        sys.exit(f"mariadb_server: {mariadbd} not found: apt-get install mariadb-server (or run `cargo xtask setup-env`)")
    port = args.port or free_port()
    top = tempfile.mkdtemp(prefix="openbox-mariadb-")
    data = os.path.join(top, "data")
    sock = os.path.join(top, "mysqld.sock")
    server = None
    try:
        subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        log = open(os.path.join(top, "mariadb.log"), "wb")
        server = subprocess.Popen(
            [mariadbd, "--no-defaults", f"--datadir={data}", "--user=root",
             f"--port={port}", "--bind-address=127.0.0.1", f"--socket={sock}",
             f"--pid-file={os.path.join(top, 'mariadb.pid')}",
             "--skip-name-resolve", "--skip-log-bin", "--innodb-buffer-pool-size=16M",
             "--innodb-log-file-size=8M", "--innodb-flush-log-at-trx-commit=0",
             "--skip-innodb-doublewrite", "--max-connections=20", "--skip-ssl"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=top,
        )
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                sys.stderr.write(open(os.path.join(top, "mariadb.log")).read())
                sys.exit("mariadb_server: MariaDB did not start")
            ping = subprocess.run(
                ["mariadb", "--no-defaults", f"--socket={sock}", "-uroot", "-e", "SELECT 1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            if ping.returncode == 0:
                break
            if stopping:
                return
            time.sleep(0.1)
        subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={sock}", "-uroot"],
            input=BOOTSTRAP.encode(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        print(port, flush=True)
        while not stopping and server.poll() is None:
            time.sleep(0.2)
        if server.poll() is not None and not stopping:
            sys.stderr.write(open(os.path.join(top, "mariadb.log")).read())
            sys.exit("mariadb_server: MariaDB exited unexpectedly")
    except subprocess.CalledProcessError as e:
        sys.exit(f"mariadb_server: {e}: {(e.stderr or b'').decode(errors='replace')}")
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
