"""PostgreSQL through psycopg2 (simple query protocol) or asyncpg (extended protocol:
Parse/Bind/Execute), over plain TCP or TLS, as user `openbox` on database `shop`
(pg_server.py --allow-plain).

Usage: client_pg.py psycopg2|asyncpg PORT OUTDIR [--tls]

Statements, in order (psycopg2 runs them in autocommit mode, so no BEGIN/COMMIT):
  1. SELECT id, name FROM items WHERE id <= 2 ORDER BY id      -> 2 rows
  2. INSERT INTO items (id, name) VALUES (10, 'marker-ins')      -> 1 row
  3. UPDATE items SET name = 'marker-upd' WHERE id >= 2          -> 3 rows
  4. SELECT * FROM missing_table_marker                          -> error 42P01
  5. DELETE FROM items WHERE id = 10                             -> 1 row
asyncpg sends 1, 2 (with $1/$2 parameters: 10, 'marker-ins') and 4 as prepared
statements; 3 and 5 via execute() without arguments (simple protocol).
Writes OUTDIR/result.json: [{"statement", "rowcount"} or {"statement", "error_code",
"error_message"}] in order (statement = the SQL text as sent).
"""

import asyncio
import json
import os
import ssl
import sys

STATEMENTS_PSYCOPG2 = [
    "SELECT id, name FROM items WHERE id <= 2 ORDER BY id",
    "INSERT INTO items (id, name) VALUES (10, 'marker-ins')",
    "UPDATE items SET name = 'marker-upd' WHERE id >= 2",
    "SELECT * FROM missing_table_marker",
    "DELETE FROM items WHERE id = 10",
]


def run_psycopg2(port, tls):
    import psycopg2

    conn = psycopg2.connect(
        host="127.0.0.1", port=port, user="openbox", dbname="shop",
        sslmode="require" if tls else "disable", gssencmode="disable", connect_timeout=20,
    )
    assert bool(conn.info.ssl_in_use) == tls
    conn.autocommit = True
    out = []
    try:
        with conn.cursor() as cur:
            for sql in STATEMENTS_PSYCOPG2:
                try:
                    cur.execute(sql)
                    out.append({"statement": sql, "rowcount": cur.rowcount})
                except psycopg2.Error as e:
                    out.append({"statement": sql, "error_code": e.pgcode,
                                "error_message": e.diag.message_primary})
    finally:
        conn.close()
    return out


async def run_asyncpg_async(port, tls):
    import asyncpg

    ctx = False
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="openbox", database="shop",
                                 ssl=ctx, timeout=20)
    out = []
    try:
        sql = "SELECT id, name FROM items WHERE id <= $1 ORDER BY id"
        rows = await conn.fetch(sql, 2)
        out.append({"statement": sql, "rowcount": len(rows)})
        sql = "INSERT INTO items (id, name) VALUES ($1, $2)"
        status = await conn.execute(sql, 10, "marker-ins")
        out.append({"statement": sql, "rowcount": int(status.split()[-1])})
        sql = "UPDATE items SET name = 'marker-upd' WHERE id >= 2"
        status = await conn.execute(sql)
        out.append({"statement": sql, "rowcount": int(status.split()[-1])})
        sql = "SELECT * FROM missing_table_marker"
        try:
            await conn.fetch(sql)
            raise AssertionError("the missing table was found")
        except asyncpg.PostgresError as e:
            out.append({"statement": sql, "error_code": e.sqlstate, "error_message": e.message})
        sql = "DELETE FROM items WHERE id = 10"
        status = await conn.execute(sql)
        out.append({"statement": sql, "rowcount": int(status.split()[-1])})
    finally:
        await conn.close()
    return out


def main():
    lib, port, outdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    tls = "--tls" in sys.argv[4:]
    if lib == "psycopg2":
        out = run_psycopg2(port, tls)
    elif lib == "asyncpg":
        out = asyncio.run(run_asyncpg_async(port, tls))
    else:
        sys.exit(f"unknown library {lib}")
    assert [o.get("rowcount") for o in out] == [2, 1, 3, None, 1], out
    assert out[3]["error_code"] == "42P01", out
    with open(os.path.join(outdir, "result.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
