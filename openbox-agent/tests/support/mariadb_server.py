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
import subprocess
import sys
import tempfile

import fixture

BOOTSTRAP = """
CREATE DATABASE shop;
CREATE USER 'openbox'@'127.0.0.1' IDENTIFIED BY 'openbox-pw';
CREATE USER 'openbox'@'localhost' IDENTIFIED BY 'openbox-pw';
GRANT ALL ON shop.* TO 'openbox'@'127.0.0.1';
GRANT ALL ON shop.* TO 'openbox'@'localhost';
CREATE TABLE shop.items (id INT PRIMARY KEY, name VARCHAR(64));
INSERT INTO shop.items VALUES (1, 'apple'), (2, 'banana'), (3, 'cherry');
"""



def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", default=os.environ.get("OPENBOX_MARIADB_BIN_DIR", "/usr/sbin"))
    parser.add_argument("port", nargs="?", type=int, default=0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("mariadb_server: run as root (mariadbd runs with --user=root)")
    fixture.handle_signals()

    mariadbd = os.path.join(args.bin_dir, "mariadbd")
    if not os.path.exists(mariadbd):
        sys.exit(f"mariadb_server: {mariadbd} not found: apt-get install mariadb-server (or run `cargo xtask setup-env`)")
    port = args.port or fixture.free_port()
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
        log_path = os.path.join(top, "mariadb.log")

        def answers():
            ping = subprocess.run(
                ["mariadb", "--no-defaults", f"--socket={sock}", "-uroot", "-e", "SELECT 1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            return ping.returncode == 0

        if not fixture.wait_until_answering("mariadb_server", server, log_path, answers, 60, poll=0.1):
            return
        subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={sock}", "-uroot"],
            input=BOOTSTRAP.encode(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        fixture.serve_until_stopped("mariadb_server", server, port, log_path)
    except subprocess.CalledProcessError as e:
        sys.exit(f"mariadb_server: {e}: {(e.stderr or b'').decode(errors='replace')}")
    finally:
        fixture.stop(server, 30)
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
