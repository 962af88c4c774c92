"""psycopg2-binary (libpq and libssl bundled in the wheel) over TLS: sslmode=require.

Usage: client_psycopg2.py PORT OUTDIR
Runs `SELECT 'marker-xyz'`; writes OUTDIR/ok once the result and TLS use checked out.
"""

import os
import sys

import psycopg2


def main():
    port, outdir = int(sys.argv[1]), sys.argv[2]
    # gssencmode=disable: without it libpq may try a GSSAPI-encryption request first
    # when Kerberos credentials exist; the tests expect the plain SSLRequest.
    conn = psycopg2.connect(
        host="127.0.0.1", port=port, user="postgres", dbname="postgres",
        sslmode="require", gssencmode="disable", connect_timeout=20,
    )
    try:
        assert conn.info.ssl_in_use, "the connection is not using TLS"
        with conn.cursor() as cur:
            cur.execute("SELECT 'marker-xyz'")
            (value,) = cur.fetchone()
        assert value == "marker-xyz", value
    finally:
        conn.close()
    open(os.path.join(outdir, "ok"), "w").close()


if __name__ == "__main__":
    main()
